/// Shared helpers for the test suite: where the fixtures are, and comparisons that report numbers.
module DiffBIR.Lab.Tests.TestSupport

open System
open System.IO
open DiffBIR.Lab.Parity
open Xunit

/// The golden fixtures (../shared/fixtures beside the checkout, or $DIFFBIR_FIXTURES).
let fixturesDir =
    match Environment.GetEnvironmentVariable "DIFFBIR_FIXTURES" with
    | null | "" ->
        // tests run from tests/DiffBIR.Lab.Tests/bin/<cfg>/net10.0: walk up to the repository root.
        let rec up (d: DirectoryInfo) =
            if isNull d then failwith "repository root (DiffBIR.Lab.sln) not found"
            elif File.Exists(Path.Combine(d.FullName, "DiffBIR.Lab.sln")) then d.FullName
            else up d.Parent
        Path.GetFullPath(Path.Combine(up (DirectoryInfo AppContext.BaseDirectory), "..", "shared", "fixtures"))
    | d -> Path.GetFullPath d

let fixture (relative: string) = Path.Combine(fixturesDir, relative)

/// The repository root (for notebooks, scripts).
let repoRoot =
    let rec up (d: DirectoryInfo) =
        if isNull d then failwith "repository root not found"
        elif File.Exists(Path.Combine(d.FullName, "DiffBIR.Lab.sln")) then d.FullName
        else up d.Parent
    up (DirectoryInfo AppContext.BaseDirectory)

/// A fresh temporary folder, deleted when disposed.
type TempDir() =
    let path = Path.Combine(Path.GetTempPath(), "diffbir-lab-tests-" + Guid.NewGuid().ToString("N"))
    do Directory.CreateDirectory path |> ignore
    member _.Path = path
    member _.File(name: string) = Path.Combine(path, name)
    interface IDisposable with
        member _.Dispose() = try Directory.Delete(path, true) with _ -> ()

/// Runs one fixture file through the parity runner and asserts every output passes; returns the report.
let assertParity (relative: string) =
    let report = ParityRunner.Default().RunFile(fixture relative)
    let failures =
        report.Outputs
        |> Seq.filter (fun o -> not o.Pass)
        |> Seq.map (fun o -> sprintf "%s max_abs=%g max_rel=%g (%O) %s" o.Name o.MaxAbs o.MaxRel o.Tolerance (defaultArg (Option.ofObj o.Note) ""))
        |> String.concat "\n"
    Assert.True((report.Status = CaseStatus.Pass), sprintf "%s: %O %s\n%s" relative report.Status (defaultArg (Option.ofObj report.Message) "") failures)
    report

/// The whole official sampler.sample(...) through the library's one loop (SamplingLoop.Run over SampleStep); an
/// observer that cancels raises OperationCanceledException.
let sampleAll (name: string) schedule options (model: DiffBIR.Lab.Diffusion.CfgDenoiser) (xT: TorchSharp.torch.Tensor) (steps: int)
              (noise: DiffBIR.Lab.Diffusion.INoiseSource) (guide: DiffBIR.Lab.Guidance.Guide) (observer: Func<DiffBIR.Lab.Sampling.StepInfo, bool>) =
    let stepper = DiffBIR.Lab.Stages.SampleStep(DiffBIR.Lab.Sampling.Samplers.Create(name, schedule, options), model)
    use state = stepper.Start(xT, steps, noise)
    match DiffBIR.Lab.Sampling.SamplingLoop.Run(stepper, state, guide, observer) with
    | null -> raise (OperationCanceledException "sampling cancelled by the observer")
    | z -> z

/// Tests that change libtorch's process-wide thread count run alone (after the parallel ones): another test running
/// meanwhile would compute with that count, and some kernels round differently with 1 thread than with 2.
[<CollectionDefinition("torch-threads", DisableParallelization = true)>]
type TorchThreadsCollection() = class end
