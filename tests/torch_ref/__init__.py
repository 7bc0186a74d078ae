"""PyTorch reference modules for conversion-parity tests.

Written with `torch.nn` only, using the upstream state-dict key names
(torchvision, timm and the reference CIFAR models), so a converted state dict
is checked key by key and logit by logit without the upstream packages.
"""
