"""Backbones for the paper's protocol: a BatchNorm-free VGG-style CNN (the official CIFAR
arm) and, with the ``efficientnet`` extra, an ImageNet-pretrained EfficientNet-Lite0."""
