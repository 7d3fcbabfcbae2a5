"""Drop-in nn.Modules of hrfast."""
