"""Run the tagger server: python -m imgsearch.tagger."""

from imgsearch.kit.server import run
from imgsearch.tagger.servicer import build_app

if __name__ == "__main__":
    run(build_app)
