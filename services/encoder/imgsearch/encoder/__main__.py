"""Entry point: `python -m imgsearch.encoder` serves EncoderService until SIGTERM."""

from imgsearch.encoder.app import build_app
from imgsearch.kit.server import run

if __name__ == "__main__":
    run(build_app)
