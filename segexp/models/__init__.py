"""Networks. Importing the package registers segexp's timm models (``resnet38d``), so
``timm.create_model("resnet38d")`` and ``backbone.name=resnet38d`` work from any entry point."""

from segexp.models import resnet38d as _resnet38d  # noqa: F401  (timm @register_model)
