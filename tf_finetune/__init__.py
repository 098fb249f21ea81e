"""tf_finetune: two-stage ResNet50 fine-tuning, Keras-native."""

__version__ = "0.1.0"
