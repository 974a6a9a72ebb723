"""tokar tokenizers: quantizers, autoencoders, tokenizer losses and the tokenizer LightningModule."""
