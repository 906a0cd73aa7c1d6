"""The GPU side: pipelines, samplers, LoRAs, hires fix and upscalers."""
