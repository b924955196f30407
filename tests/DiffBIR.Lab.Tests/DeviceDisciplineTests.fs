/// Device discipline without a GPU (issue 14): every run-time tensor takes its device from its inputs. A tensor factory
/// without a device (torch.zeros, full, tensor, linspace, …) makes a CPU tensor, which on CUDA meets a GPU tensor and
/// fails ("Expected all tensors to be on the same device") — a bug our CPU-only CI could never see. This test reads
/// the library's source (src/DiffBIR.Lab; the fixture machinery lives in DiffBIR.Lab.Parity) and fails on any such
/// call outside the reviewed allow-list below.
module DiffBIR.Lab.Tests.DeviceDisciplineTests

open System.IO
open System.Text.RegularExpressions
open Xunit
open DiffBIR.Lab.Tests.TestSupport

let private factory = Regex(@"\btorch\.(zeros|ones|empty|full|randn|rand|randint|arange|linspace|eye|tensor|normal)\(")

/// Folders and files whose tensors are host-side by design, each with the reason.
let private allowedFiles =
    [ "Checkpoints/", "checkpoint tensors are read into host memory; loading copies them into the module's parameters"
      "IO/", "images are decoded and encoded on the host"
      "Degradation/", "the training degradations run on the host, as the official dataset workers do"
      "Data/", "procedural training images are rendered on the host"
      "Metrics/Niqe/", "NIQE is a host-side float64 computation"
      "Metrics/Metric.cs", "score vectors returned to the caller and placeholder token ids (host)"
      "Metrics/Lpips/Lpips.cs", "module constants registered as buffers: they move with module.to(device)"
      "Models/Clip/ClipTokenizer.cs", "token ids; FrozenOpenClipEmbedder.Encode moves them to the encoder's device"
      "Pipeline/PilResize.cs", "the Pillow-exact resize works on host bytes"
      "Training/TrainingDraws.cs", "training draws replay the official host RNG order"
      "Diffusion/NoiseSchedule.cs", "schedule buffers; Extract moves them to the input's device"
      "Sampling/Sampler.cs", "F32 builds schedule buffers on the host; SamplerContext.Persist moves them to the run's device"
      "Sampling/EdmSampler.cs", "σ / timestep tables: persisted (moved to the run's device) or returned to parity as host buffers" ]

/// Single lines reviewed as host-side, by file and a fragment of the line.
let private allowedLines =
    [ "Pipeline/Presets.cs", "torch.CPU, generator: gen", "seeded random init draws on a host generator, then copies into the parameters"
      "Diffusion/NoiseSource.cs", "torch.CPU, generator: g", "noise is drawn on host generators (device-independent streams) and moved to the target's device" ]

let private violations () =
    let root = Path.Combine(repoRoot, "src", "DiffBIR.Lab")
    [ for f in Directory.GetFiles(root, "*.cs", SearchOption.AllDirectories) do
        let rel = Path.GetRelativePath(root, f).Replace('\\', '/')
        if not (rel.StartsWith "bin/" || rel.StartsWith "obj/") && not (allowedFiles |> List.exists (fun (p, _) -> rel.StartsWith p)) then
            let lines = File.ReadAllLines f
            for i in 0 .. lines.Length - 1 do
                let line = lines.[i]
                let code = line.Trim()
                let isComment = code.StartsWith "//" || code.StartsWith "*"
                let constructs = code.Contains "new Parameter(" || code.Contains "register_buffer("
                let reviewed = allowedLines |> List.exists (fun (p, frag, _) -> rel = p && line.Contains(frag: string))
                if factory.IsMatch line && not isComment && not constructs && not (line.Contains "device") && not reviewed then
                    yield sprintf "%s:%d: %s" rel (i + 1) code ]

[<Fact>]
let ``no run-time tensor factory without a device outside the reviewed allow-list`` () =
    let v = violations ()
    Assert.True(List.isEmpty v,
        sprintf "%d tensor factory call(s) make host tensors in run-time code; pass device: (and dtype:) from an input, or add the file to the allow-list with the reason:\n%s"
            v.Length (String.concat "\n" v))

[<Fact>]
let ``the scan finds a factory without a device (it can fail)`` () =
    factory.IsMatch "var t = torch.full(new[] { bs }, step, ScalarType.Int64);" |> Assert.True
    factory.IsMatch "var t = torch.zeros_like(x);" |> Assert.False
