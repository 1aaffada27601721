"""Small shared helpers: logging, atomic files, hashing, devices, progress bars."""
