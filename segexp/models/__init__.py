"""Networks. Importing the package registers segexp's timm models (``resnet38d``, ``small_cnn_w16/w32/w64``),
so ``timm.create_model("resnet38d")`` and ``backbone.name=small_cnn_w32`` work from any entry point."""

from segexp.models import resnet38d as _resnet38d  # noqa: F401  (timm @register_model)
from segexp.models import small_cnn as _small_cnn  # noqa: F401  (timm @register_model)
