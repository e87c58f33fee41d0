"""Self-supervised methods. Importing this package registers every method by name."""

from dense_ssl.methods import base
from dense_ssl.methods.base import create, names, register
