"""Triton kernels (backend "triton"); installed as fastgmmdiff.kernels.  See README.md here."""
