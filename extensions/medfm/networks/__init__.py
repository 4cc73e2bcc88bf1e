"""Networks of the published foundation models, one architecture per file."""

from .genesis_unet3d import GenesisUNet3D
from .layers import GradientReversal
from .medical_transformer import MedicalTransformer
from .spad_tokenizer import SpadTokenizer
from .spad_vit import SpadViT
from .universal_model_sar import UniversalModelSAR
from .vdt_resnet3d import VDTResNet3D, vdt_resnet18
from .vdt_resnet3d_unet import VDTResNetUNet

__all__ = ["GenesisUNet3D", "GradientReversal", "MedicalTransformer", "SpadTokenizer", "SpadViT", "UniversalModelSAR", "VDTResNet3D", "VDTResNetUNet", "vdt_resnet18"]
