"""Which two files LPIPS needs and where they come from; torch-free, so `compare` can say so in
milliseconds when LPIPS is skipped, without importing torch."""

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
LIN_FILE = "alex.pth"
ALEXNET_SOURCE = f"torchvision's AlexNet ImageNet weights, https://download.pytorch.org/models/{ALEXNET_FILE}"
LIN_SOURCE = "the `lpips` PyPI package's lpips/weights/v0.1/alex.pth"
SKIPPED = (f"LPIPS skipped: pass --lpips-weights DIR, a folder holding {ALEXNET_FILE} ({ALEXNET_SOURCE}) "
           f"and {LIN_FILE} ({LIN_SOURCE}); nothing is downloaded")
#: smallest frame whose features survive AlexNet's stride-4 conv and two 3x3/2 max-pools
LPIPS_MIN_SIZE = 31
