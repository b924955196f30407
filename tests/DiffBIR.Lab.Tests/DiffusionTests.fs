/// Tests for one part of the model zoo / diffusion core (filled in by the work on that part).
module DiffBIR.Lab.Tests.DiffusionTests

open Xunit
open FsUnit.Xunit
open DiffBIR.Lab.Tests.TestSupport
