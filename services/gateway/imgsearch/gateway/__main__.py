"""Run the gateway server: python -m imgsearch.gateway."""

from imgsearch.gateway.servicer import build_app
from imgsearch.kit.server import run

if __name__ == "__main__":
    run(build_app)
