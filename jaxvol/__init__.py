"""jaxvol: diffusion on whole 3D medical volumes in JAX."""

__version__ = "0.1.0"
