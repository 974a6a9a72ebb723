"""tokar datasets and the LightningDataModule that serves them."""
