"""The LightningModule, EMA and callbacks."""
