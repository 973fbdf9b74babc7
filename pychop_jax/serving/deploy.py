"""placeholder"""
def serve_model(*a, **k):
    raise NotImplementedError
