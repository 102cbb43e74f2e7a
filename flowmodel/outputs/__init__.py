"""Writers (atomic) and the HTML report."""
