"""Data: loading datasets (digits, Fashion-MNIST, CIFAR, image folders), stratified splits and their digest,
the prepared on-disk format, and on-device batching and augmentation."""
