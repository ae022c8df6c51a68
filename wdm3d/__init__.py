"""wdm3d: wavelet-domain diffusion and wavelet autoencoders for 3D medical volumes."""

__version__ = "0.1.0"
