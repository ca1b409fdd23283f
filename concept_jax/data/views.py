"""What one augmented view of a training image is; TensorFlow-free so methods can import it anywhere."""
import dataclasses


@dataclasses.dataclass(frozen=True)
class ViewSpec:
  """RandomResizedCrop(size, scale, ratio) then an optional horizontal flip, as torchvision does."""
  size: int = 224
  scale: tuple[float, float] = (0.08, 1.0)
  ratio: tuple[float, float] = (3 / 4, 4 / 3)
  flip: bool = True
