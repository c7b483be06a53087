"""cgan: make image data unlearnable with a ConfounderGAN noise generator."""

__version__ = "0.1.0"
