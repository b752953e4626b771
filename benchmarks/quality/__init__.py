"""Quality benchmark: tiny real diffusion models trained here, LoRAs transferred by prolora and
scored against LoRAs trained on the targets. Run `python -m benchmarks.quality run`."""
