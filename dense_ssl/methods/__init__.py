"""Self-supervised methods. Importing this package registers every method (and every method's
parity checker) by name; see `base.py` for the contract a method implements."""

from dense_ssl.methods import base
from dense_ssl.methods.base import MethodState, StepOutput, ViewSpec, create, names, register
from dense_ssl.methods import families
from dense_ssl.methods import mocov2
from dense_ssl.methods import byol
from dense_ssl.methods import densecl
from dense_ssl.methods import houghcl
from dense_ssl.methods import dilemma
from dense_ssl.methods import univip
from dense_ssl.methods import conmim
from dense_ssl.methods import vit_hosts
from dense_ssl.methods import mocov3
from dense_ssl.methods import simclr
from dense_ssl.methods import dino
