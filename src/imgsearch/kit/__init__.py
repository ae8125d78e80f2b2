"""Service kit shared by every imgsearch server: settings, logging, metrics, errors, gRPC plumbing."""
