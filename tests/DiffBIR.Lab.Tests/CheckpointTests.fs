/// Checkpoints in: safetensors and PyTorch pickles (zip and legacy), the official unwrapping rules, refusal of
/// hostile pickles, strict loading into modules, and our own safetensors writer.
module DiffBIR.Lab.Tests.CheckpointTests

open System
open System.IO
open System.Collections.Generic
open Xunit
open FsUnit.Xunit
open TorchSharp
open DiffBIR.Lab.Checkpoints
open DiffBIR.Lab.Tests.TestSupport

let private ckpt name = fixture (Path.Combine("checkpoints", name))

[<Fact>]
let ``every checkpoint layout of the fixtures loads with exact values (parity with expected.json)`` () =
    let r = assertParity (Path.Combine("checkpoints", "expected.json"))
    // 5 layouts × 8 tensors + 4 views + 3 refusals
    r.Outputs.Count |> should equal 47

[<Fact>]
let ``dtypes survive: float16, bfloat16 and an int64 scalar`` () =
    use sd = Checkpoint.Load(ckpt "plain_state_dict.pth")
    sd.Format |> should equal "torch-zip"
    sd.["half.weight"].dtype |> should equal torch.ScalarType.Float16
    sd.["bf16.weight"].dtype |> should equal torch.ScalarType.BFloat16
    sd.["norm.num_batches_tracked"].dtype |> should equal torch.ScalarType.Int64
    sd.["norm.num_batches_tracked"].shape |> should be Empty

[<Fact>]
let ``Lightning checkpoints are unwrapped and their plain values kept as metadata`` () =
    use sd = Checkpoint.Load(ckpt "lightning_style.ckpt")
    sd.Count |> should equal 8
    sd.Notes |> should contain "unwrapped 'state_dict'"
    sd.Metadata.["epoch"] |> should equal "3"
    sd.Metadata.["global_step"] |> should equal "1000"

[<Fact>]
let ``DataParallel 'module.' prefixes are stripped and BasicSR params_ema unwrapped`` () =
    use dp = Checkpoint.Load(ckpt "dataparallel_prefix.pth")
    dp.Tensors.Keys |> Seq.exists (fun k -> k.StartsWith "module.") |> should be False
    dp.Tensors.ContainsKey "conv.weight" |> should be True
    use ema = Checkpoint.Load(ckpt "params_ema.pth")
    ema.Notes |> should contain "unwrapped 'params_ema'"
    ema.Tensors.ContainsKey "conv.weight" |> should be True

[<Fact>]
let ``the legacy (pre-1.6) format loads`` () =
    use sd = Checkpoint.Load(ckpt "legacy_format.pt")
    sd.Format |> should equal "torch-legacy"
    sd.Count |> should equal 8

[<Fact>]
let ``a truncated checkpoint is refused naming the file`` () =
    let e = Assert.ThrowsAny<CheckpointException>(fun () -> Checkpoint.Load(ckpt "truncated.pth").Dispose())
    e.Message |> should haveSubstring "truncated.pth"

let private noPwnedFiles () =
    for d in [ Directory.GetCurrentDirectory(); fixture "checkpoints"; Path.GetTempPath(); repoRoot ] do
        File.Exists(Path.Combine(d, "pwned_by_checkpoint.txt")) |> should be False
        File.Exists(Path.Combine(d, "pwned_by_eval.txt")) |> should be False

[<Fact>]
let ``a pickle whose __reduce__ runs a command is refused, naming the global, and runs nothing`` () =
    let e = Assert.Throws<PickleSecurityException>(fun () -> Checkpoint.Load(ckpt "malicious_reduce.pth").Dispose())
    e.Global |> should haveSubstring "system"
    e.Message |> should haveSubstring "malicious_reduce.pth"
    noPwnedFiles ()

[<Fact>]
let ``a plain pickle calling eval is refused, naming the global`` () =
    let e = Assert.Throws<PickleSecurityException>(fun () -> Checkpoint.Load(ckpt "malicious_eval.ckpt").Dispose())
    e.Global |> should haveSubstring "eval"
    noPwnedFiles ()

[<Fact>]
let ``a global called with zero arguments is refused too (it must not come back as a silent value)`` () =
    use dir = new TempDir()
    // PROTO 2, GLOBAL os.getcwd, EMPTY_TUPLE, REDUCE, STOP — inside a torch zip layout.
    let pkl = Array.concat [ [| 0x80uy; 2uy |]; Text.Encoding.ASCII.GetBytes "cos\ngetcwd\n"; [| 0x29uy; 0x52uy; 0x2euy |] ]
    let path = dir.File "zeroarg.pth"
    do
        use fs = File.Create path
        use zip = new Compression.ZipArchive(fs, Compression.ZipArchiveMode.Create)
        use s = zip.CreateEntry("zeroarg/data.pkl").Open()
        s.Write(pkl, 0, pkl.Length)
    let e = Assert.Throws<PickleSecurityException>(fun () -> Checkpoint.Load(path).Dispose())
    e.Global |> should equal "os.getcwd"

[<Fact>]
let ``every fixture safetensors file reads, with all its dtypes`` () =
    let files = Directory.GetFiles(fixturesDir, "*.safetensors", SearchOption.AllDirectories)
    files.Length |> should be (greaterThanOrEqualTo 17)
    let dtypes = HashSet<torch.ScalarType>()
    for f in files do
        let header = SafeTensors.ReadHeader f
        header.Metadata.ContainsKey "case" |> should be True
        let content = SafeTensors.Load(f, fun n -> n.StartsWith "in.")
        for t in content.Tensors.Values do
            dtypes.Add t.dtype |> ignore
            t.Dispose()
        header.Entries.Count |> should be (greaterThan 0)
    dtypes |> should contain torch.ScalarType.Float32
    dtypes |> should contain torch.ScalarType.Int64
    dtypes |> should contain torch.ScalarType.Byte

[<Fact>]
let ``safetensors values agree with the README's statistics`` () =
    let content = SafeTensors.Load(fixture "vae.safetensors")
    content.Metadata.["case"] |> should equal "vae"
    let m = content.Tensors.["out.posterior_mean"]
    m.shape |> should equal [| 1L; 4L; 16L; 16L |]
    m.mean().item<float32>() |> should (equalWithin 5e-5) 0.1881
    for t in content.Tensors.Values do t.Dispose()

[<Fact>]
let ``our safetensors writer round-trips every dtype and the metadata, atomically`` () =
    use dir = new TempDir()
    let tensors =
        dict [ "f32", torch.randn(3L, 4L)
               "f64", torch.randn(2L).to_type(torch.ScalarType.Float64)
               "f16", torch.randn(5L).to_type(torch.ScalarType.Float16)
               "bf16", torch.randn(5L).to_type(torch.ScalarType.BFloat16)
               "i64", torch.arange(7L)
               "u8", torch.arange(5L).to_type(torch.ScalarType.Byte)
               "scalar", torch.tensor(3.5f)
               "strided", torch.randn(4L, 3L).t() ]
    let path = dir.File "ours.safetensors"
    SafeTensors.Save(path, Dictionary(tensors), dict [ "format", "pt"; "source", "DiffBIR.Lab" ] |> Dictionary)
    Directory.GetFiles dir.Path |> Array.length |> should equal 1
    use back = Checkpoint.Load path
    back.Format |> should equal "safetensors"
    back.Metadata.["source"] |> should equal "DiffBIR.Lab"
    for KeyValue(k, t) in tensors do
        back.[k].dtype |> should equal t.dtype
        back.[k].shape |> should equal t.shape
        back.[k].equal(t).all().item<bool>() |> should be True

[<Fact>]
let ``corrupt safetensors files are refused naming the file`` () =
    use dir = new TempDir()
    let path = dir.File "bad.safetensors"
    SafeTensors.Save(path, Dictionary(dict [ "w", torch.randn(64L, 64L) ]))
    let b = File.ReadAllBytes path
    File.WriteAllBytes(path, b.[.. b.Length - 100])
    let e = Assert.ThrowsAny<CheckpointException>(fun () -> SafeTensors.Load(path) |> ignore)
    e.Message |> should haveSubstring "bad.safetensors"
    e.Message |> should haveSubstring "truncated"
    File.WriteAllBytes(path, Array.append (BitConverter.GetBytes(1L <<< 40)) b.[8..])
    Assert.ThrowsAny<CheckpointException>(fun () -> SafeTensors.Load(path) |> ignore).Message |> should haveSubstring "header"

type private Tiny() as this =
    inherit torch.nn.Module<torch.Tensor, torch.Tensor>("Tiny")
    let conv = torch.nn.Conv2d(3L, 4L, 3L)
    let proj = torch.nn.Linear(4L, 8L)
    do this.RegisterComponents()
    override _.forward x = proj.forward(conv.forward(x).mean([| 2L; 3L |]))

[<Fact>]
let ``strict loading reports missing, unexpected and mis-shaped keys by name`` () =
    use m = new Tiny()
    use sd = Checkpoint.Load(ckpt "plain_state_dict.pth")
    let e = Assert.Throws<StateDictMismatchException>(fun () -> StateDictLoader.Load(m, sd.Tensors, sourceName = "plain_state_dict.pth") |> ignore)
    e.Report.Unexpected |> should contain "norm.weight"
    e.Report.ShapeMismatches |> Seq.exists (fun s -> s.StartsWith "proj.weight") |> should be True
    e.Message |> should haveSubstring "plain_state_dict.pth"
    let partial = Dictionary(dict [ "conv.weight", sd.["conv.weight"]; "conv.bias", sd.["conv.bias"] ])
    let e2 = Assert.Throws<StateDictMismatchException>(fun () -> StateDictLoader.Load(m, partial) |> ignore)
    List.ofSeq e2.Report.Missing |> should equal [ "proj.weight"; "proj.bias" ]

[<Fact>]
let ``a matching state dict loads exactly, casting dtypes`` () =
    use m = new Tiny()
    let src = Dictionary<string, torch.Tensor>()
    for KeyValue(k, v) in m.state_dict() do src.[k] <- torch.randn(v.shape).to_type(torch.ScalarType.Float16)
    let report = StateDictLoader.Load(m, src)
    report.IsExact |> should be True
    report.Loaded |> should equal 4
    for KeyValue(k, v) in m.state_dict() do
        v.dtype |> should equal torch.ScalarType.Float32
        v.equal(src.[k].to_type(torch.ScalarType.Float32)).all().item<bool>() |> should be True

[<Fact>]
let ``Stable Diffusion prefixes map to unet, vae and clip`` () =
    SdCheckpointKeys.Map "model.diffusion_model.out.2.weight" |> should equal "unet.out.2.weight"
    SdCheckpointKeys.Map "first_stage_model.decoder.conv_in.bias" |> should equal "vae.decoder.conv_in.bias"
    SdCheckpointKeys.Map "cond_stage_model.model.ln_final.weight" |> should equal "clip.model.ln_final.weight"
    SdCheckpointKeys.Map "model_ema.decay" |> should equal null
    assertParity (Path.Combine("schema", "sd_checkpoint_key_map.json")) |> ignore
