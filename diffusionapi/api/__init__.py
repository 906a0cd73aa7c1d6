"""Thin HTTP routes: catalog (models, loras, upscalers, samplers) and jobs (txt2img, queue)."""
