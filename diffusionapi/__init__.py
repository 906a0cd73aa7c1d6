"""DiffusionAPI: Stable Diffusion behind an asynchronous HTTP job queue."""
__version__ = "0.1.0"
