"""Self-supervised methods. Importing this package registers every method by name."""

from dense_ssl.methods import base
from dense_ssl.methods.base import create, names, register
from dense_ssl.methods import mocov2
from dense_ssl.methods import densecl
from dense_ssl.methods import houghcl
