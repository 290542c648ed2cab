"""Subject data: the VHAP/GaussianAvatars reader, the synthetic generator, splits."""
