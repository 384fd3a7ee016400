"""The networks as pure nn.Modules: they build on the meta device and do no I/O or offload."""
