"""The distillation core: the objective (weighted terms over taps), stage terms, and the LightningModule."""
