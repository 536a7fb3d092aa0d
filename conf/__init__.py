"""The Hydra configs of gemma4vl, importable as gemma4vl.conf (gemma4vl/conf links here) so that recipes find them
wherever the package is installed (config_path="pkg://gemma4vl.conf")."""
