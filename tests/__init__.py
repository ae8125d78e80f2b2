"""imgsearch tests."""
