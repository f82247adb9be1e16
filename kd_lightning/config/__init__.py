"""Configuration: typed specs parsed once (`run_spec`), the optimiser and schedule, the config files and
Hydra helpers. Imports nothing heavier than Hydra and OmegaConf at module level."""
