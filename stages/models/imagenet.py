"""ImageNet's channel mean and standard deviation: the input normalisation of the encoders rae uses
(DINOv2, MAE), of the discriminator's DINO backbone, and what the decoder undoes by default."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
