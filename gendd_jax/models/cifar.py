"""The CIFAR-100 model zoo of the reference (RepDistiller/CRD models).

Registry names are the reference's `model_dict` keys in lower case, except
`cifar_resnet50` (its `ResNet50`, kept apart from the ImageNet ResNet-50),
`mobilenetv2` (`MobileNetV2`, i.e. `mobile_half`) and `vgg*` (the `_bn`
variants). Every builder carries `default_image_size = 32`; the returned
feature is the input of the classifier `fc` (the reference's `feat[-1]`).
"""

from __future__ import annotations

from gendd_jax.models import cifar_mobile
from gendd_jax.models import cifar_resnet
from gendd_jax.models import cifar_vgg

MODELS = {**cifar_resnet.MODELS, **cifar_vgg.MODELS, **cifar_mobile.MODELS}
