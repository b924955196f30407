/// The `train` command and its parts (issue 11): the streaming loader, the run loop with checkpoints and resume,
/// stage 1 and stage 2 (IRControlNet, Variants 5 and 6) on tiny networks on the CPU, and the CLI's bad-input path.
[<Xunit.Collection("torch-threads")>]
module DiffBIR.Lab.Tests.TrainCommandTests

open System
open System.IO
open System.Threading
open Xunit
open FsUnit.Xunit
open TorchSharp
open DiffBIR.Lab.Checkpoints
open DiffBIR.Lab.IO
open DiffBIR.Lab.Models.StableDiffusion
open DiffBIR.Lab.Training
open DiffBIR.Lab.Tests.TestSupport

/// A folder of small distinct HQ images (the test card, shifted and flipped) plus, optionally, a corrupt PNG.
let private makeData (dir: string) (count: int) (corrupt: bool) =
    Directory.CreateDirectory dir |> ignore
    use card = TestImages.Card(80, 96)
    for k in 0 .. count - 1 do
        use shifted = card.roll([| int64 (7 * k); int64 (11 * k) |], [| 2L; 3L |])
        use img = if k % 2 = 1 then shifted.flip(2L) else shifted.alias()
        ImageIO.Save(Path.Combine(dir, sprintf "hq%02d.png" k), img)
    if corrupt then File.WriteAllBytes(Path.Combine(dir, "broken.png"), [| 0x89uy; 0x50uy; 0x4Euy; 0x47uy; 1uy; 2uy; 3uy |])
    dir

/// The tiny recipe of a stage with quiet logging, checkpoints only at the end, and the given JSON overrides.
let private tinyOptions (stage: string) (data: string) (overrides: string) =
    let o = Text.Json.Nodes.JsonNode.Parse("{" + overrides + "}").AsObject()
    o.["data"] <- Text.Json.Nodes.JsonValue.Create data
    for k, v in [ "log_every", 1000; "ckpt_every", 0; "val_every", 0; "sample_every", 0 ] do
        if not (o.ContainsKey k) then o.[k] <- Text.Json.Nodes.JsonValue.Create v
    TrainOptions.Defaults(stage, true).Merge(o, "test")

/// Training tests run with one libtorch thread (in the non-parallel collection): on a loaded 2-core machine the
/// tiny networks are 5-10× faster than with two spinning threads, and each test stays well under a minute.
let private oneThread () =
    let before = torch.get_num_threads()
    torch.set_num_threads 1
    { new IDisposable with member _.Dispose() = torch.set_num_threads before }

/// Runs the loop with a silent log; returns the result.
let private train (o: TrainOptions) (runDir: string) (resume: bool) (ct: CancellationToken) =
    use trainer = Trainers.Create o
    let run = TrainRun(o, runDir, Log = TextWriter.Null)
    run.Run(trainer, resume, ct)

let private meanOf (xs: float list) = List.average xs

// ---- loader ----

[<Fact>]
let ``loader: batches are the same whatever the queue size, and a corrupt image is skipped with one warning naming it`` () =
    use dir = new TempDir()
    let data = makeData (dir.File "hq") 3 true
    let items = TrainingSet.Find data
    items.Count |> should equal 4
    let batches (queue: int) (warn: TextWriter) =
        let o = TrainingDataOptions(OutSize = 32, BatchSize = 2, Seed = 5L, QueueCapacity = queue)
        use loader = new TrainingLoader(items, o, 0L, warn)
        [ for _ in 1 .. 4 do
            use b = loader.Next()
            b.Gt.shape |> should equal [| 2L; 32L; 32L; 3L |]
            b.Lq.shape |> should equal [| 2L; 32L; 32L; 3L |]
            yield b.Gt.clone(), b.Lq.clone(), List.ofSeq b.Files ]
    let w1, w8 = new StringWriter(), new StringWriter()
    let a, b = batches 1 w1, batches 8 w8
    for (g1, l1, f1), (g2, l2, f2) in List.zip a b do
        f1 |> should equal f2
        (g1 - g2).abs().max().item<float32>() |> should equal 0.0f
        (l1 - l2).abs().max().item<float32>() |> should equal 0.0f
        g1.min().item<float32>() |> should be (greaterThanOrEqualTo -1.0f)
        l1.max().item<float32>() |> should be (lessThanOrEqualTo 1.0f)
    // 8 samples over 2+ epochs of 3 readable images: the corrupt one is met at least twice but named once
    let lines = w1.ToString().Split('\n', StringSplitOptions.RemoveEmptyEntries)
    lines.Length |> should equal 1
    lines.[0] |> should haveSubstring "broken.png"
    lines.[0] |> should haveSubstring "skipped"
    a |> List.collect (fun (_, _, f) -> f) |> List.exists (fun f -> f.EndsWith "broken.png") |> should be False
    // a different seed gives different crops / degradations
    let o2 = TrainingDataOptions(OutSize = 32, BatchSize = 2, Seed = 6L)
    use other = new TrainingLoader(items, o2, 0L, TextWriter.Null)
    use ob = other.Next()
    let (g0, _, _) = a.Head
    (if g0.shape = ob.Gt.shape then (g0 - ob.Gt).abs().max().item<float32>() else 1.0f) |> should be (greaterThan 0.0f)

// ---- stage 1 ----

[<Fact>]
let ``stage 1: the summed MSE falls over 50 steps on a tiny fixed dataset`` () =
    use _threads = oneThread ()
    use dir = new TempDir()
    let data = makeData (dir.File "hq") 2 false
    let o = tinyOptions "stage1" data "\"steps\": 50, \"batch_size\": 1"
    let r = train o (dir.File "run") false CancellationToken.None
    let losses = r.Metrics |> Seq.map (fun m -> m.Loss) |> List.ofSeq
    losses.Length |> should equal 50
    let first, last = meanOf losses.[0..9], meanOf losses.[40..49]
    Assert.True(last < 0.8 * first, sprintf "mean loss of steps 1-10 %.1f, of steps 41-50 %.1f: %A" first last losses)
    File.Exists(dir.File "run/checkpoints/step_50.safetensors") |> should be True

[<Fact>]
let ``stage 1: our checkpoint's keys and shapes are the official SwinIR schema`` () =
    use dir = new TempDir()
    let o = TrainOptions.Defaults("stage1", false)
    use trainer = Trainers.Create o
    let path = dir.File "swinir.safetensors"
    TrainingCheckpoint.Save(trainer.Trainable, path, 0L, trainer.CheckpointMetadata)
    let header = SafeTensors.ReadHeader path
    let shapes = header.Entries |> Seq.map (fun e -> Collections.Generic.KeyValuePair(e.Name, e.Shape)) |> Collections.Generic.Dictionary
    let report = Schema.Load(fixture "schema/swinir.json").Compare(shapes)
    Assert.True(report.IsExact, report.Describe())
    header.Metadata.["stage"] |> should equal "stage1"

// ---- resume and Ctrl+C ----

[<Fact>]
let ``resume: 4 steps straight equal 2 steps, an interruption, a resume and 2 more, bit for bit`` () =
    use _threads = oneThread ()
    use dir = new TempDir()
    let data = makeData (dir.File "hq") 3 false
    let o = tinyOptions "stage1" data "\"steps\": 4, \"batch_size\": 1, \"grad_accum\": 2"
    let straight = train o (dir.File "a") false CancellationToken.None
    // the second run is cancelled after its 2nd step: it saves a checkpoint there and reports the interruption
    use cts = new CancellationTokenSource()
    let interrupted =
        use trainer = Trainers.Create o
        let run = TrainRun(o, dir.File "b", Log = TextWriter.Null, OnStep = (fun r -> if r.Step = 2L then cts.Cancel()))
        run.Run(trainer, false, cts.Token)
    interrupted.Interrupted |> should be True
    interrupted.Step |> should equal 2L
    interrupted.LastCheckpoint |> should endWith "step_2.safetensors"
    let resumed = train o (dir.File "b") true CancellationToken.None
    resumed.Step |> should equal 4L
    let lossAt (r: TrainResult) step = (r.Metrics |> Seq.find (fun m -> m.Step = step)).Loss
    // metrics.jsonl of the resumed run keeps steps 1-2 and continues with 3-4
    resumed.Metrics |> Seq.map (fun m -> m.Step) |> List.ofSeq |> should equal [ 1L; 2L; 3L; 4L ]
    for s in 1L .. 4L do lossAt resumed s |> should equal (lossAt straight s)
    // the final weights are identical
    let wa = SafeTensors.Load(dir.File "a/checkpoints/step_4.safetensors").Tensors
    let wb = SafeTensors.Load(dir.File "b/checkpoints/step_4.safetensors").Tensors
    for kv in wa do (kv.Value.to_type(torch.ScalarType.Float64) - wb.[kv.Key].to_type(torch.ScalarType.Float64)).abs().max().item<float>() |> should equal 0.0
    // the checkpoint carries AdamW's moments and step counts
    let optim = dir.File "b/checkpoints/step_2.optim.safetensors"
    let st = SafeTensors.Load optim
    st.Metadata |> Seq.filter (fun kv -> kv.Key.StartsWith "step.") |> Seq.forall (fun kv -> kv.Value = "2") |> should be True
    st.Tensors.Keys |> Seq.exists (fun k -> k.StartsWith "exp_avg_sq.") |> should be True

// ---- stage 2 and the variants ----

[<Theory>]
[<InlineData("irc")>]
[<InlineData("v5")>]
[<InlineData("v6")>]
let ``stage 2: the loss falls over 50 steps and only the ControlNet learns`` (variant: string) =
    use _threads = oneThread ()
    use dir = new TempDir()
    let data = makeData (dir.File "hq") 2 false
    let o = tinyOptions "stage2" data (sprintf "\"steps\": 50, \"batch_size\": 1, \"lr\": 1e-3, \"variant\": \"%s\", \"p_empty\": 0" variant)
    use trainer = Trainers.Create o
    let cldm = (trainer.Trainable :?> ControlNet)
    let frozen = (trainer :?> Stage2Training).Cldm.unet.state_dict() |> Seq.map (fun kv -> kv.Key, kv.Value.clone()) |> List.ofSeq
    let run = TrainRun(o, dir.File "run", Log = TextWriter.Null)
    let r = run.Run(trainer, false, CancellationToken.None)
    // the SD UNet did not move
    let after = (trainer :?> Stage2Training).Cldm.unet.state_dict()
    for k, v in frozen do (v - after.[k]).abs().max().item<float32>() |> should equal 0.0f
    let losses = r.Metrics |> Seq.map (fun m -> m.Loss) |> List.ofSeq
    let first, last = meanOf losses.[0..9], meanOf losses.[40..49]
    Assert.True(last < 0.8 * first, sprintf "%s: mean loss of steps 1-10 %.4f, of steps 41-50 %.4f: %A" variant first last losses)
    let path = dir.File "run/checkpoints/step_50.safetensors"
    let expected = Trainers.ParseVariant variant
    TrainingCheckpoint.ControlModeOf path |> should equal expected
    cldm.Mode |> should equal expected
    // the variant's added convs are in the checkpoint and moved away from their zero start
    let w = SafeTensors.Load(path).Tensors
    let added = w.Keys |> Seq.filter (fun k -> k.StartsWith "decoder_convs." || k.StartsWith "gamma_convs." || k.StartsWith "middle_block_gamma.") |> List.ofSeq
    match variant with
    | "irc" -> added |> should be Empty
    | _ -> added |> List.exists (fun k -> w.[k].abs().max().item<float32>() > 0.0f) |> should be True

[<Fact>]
let ``stage 2: a saved Variant-5 checkpoint names its variant and reloads into a ControlNet with identical outputs`` () =
    use _threads = oneThread ()
    use dir = new TempDir()
    let data = makeData (dir.File "hq") 1 false
    let o = tinyOptions "stage2" data "\"steps\": 1, \"batch_size\": 1, \"lr\": 1e-3, \"variant\": \"v5\""
    use trainer = Trainers.Create o
    let run = TrainRun(o, dir.File "run", Log = TextWriter.Null)
    let r = run.Run(trainer, false, CancellationToken.None)
    let path = r.LastCheckpoint
    let mode = TrainingCheckpoint.ControlModeOf path
    mode |> should equal ControlMode.ConcatFeatures
    let cfg = Trainers.TinyCldm mode
    use cn = new ControlNet(cfg.ControlNet, mode)
    StateDictLoader.Load(cn, SafeTensors.Load(path).Tensors, true, path) |> ignore
    let trained = trainer.Trainable :?> ControlNet
    trained.eval() |> ignore
    cn.eval() |> ignore
    use _ = torch.no_grad()
    use gen = new torch.Generator(3UL)
    use x = torch.randn([| 1L; 4L; 8L; 8L |], generator = gen)
    use hint = torch.randn([| 1L; 4L; 8L; 8L |], generator = gen)
    use t = torch.tensor([| 500L |])
    use ctx = torch.randn([| 1L; 77L; 32L |], generator = gen)
    use a = trained.forward(x, hint, t, ctx)
    use b = cn.forward(x, hint, t, ctx)
    a.Decoder |> should not' (be Null)
    for ra, rb in Seq.zip (Seq.append a.Residuals a.Decoder) (Seq.append b.Residuals b.Decoder) do
        (ra - rb).abs().max().item<float32>() |> should equal 0.0f
    // an IRControlNet (Add) model cannot take it strictly: the variant's convs are extra keys
    use plain = new ControlNet(cfg.ControlNet, ControlMode.Add)
    (fun () -> StateDictLoader.Load(plain, SafeTensors.Load(path).Tensors, true, path) |> ignore) |> should throw typeof<CheckpointException>

// ---- CLI ----

[<Theory>]
[<InlineData("steps0", "--steps")>]
[<InlineData("nodata", "--data")>]
[<InlineData("variant", "--variant")>]
[<InlineData("outfile", "-o")>]
[<InlineData("resume", "--resume")>]
let ``train: bad input exits 2 with one error line naming the option`` (case: string) (expected: string) =
    use dir = new TempDir()
    let data = makeData (dir.File "hq") 1 false
    File.WriteAllText(dir.File "afile", "x")
    let args =
        match case with
        | "steps0" -> [ "train"; "stage1"; "--tiny"; "--data"; data; "-o"; dir.File "run"; "--steps"; "0" ]
        | "nodata" -> [ "train"; "stage1"; "--tiny"; "--data"; dir.File "missing"; "-o"; dir.File "run" ]
        | "variant" -> [ "train"; "stage2"; "--tiny"; "--data"; data; "-o"; dir.File "run"; "--variant"; "v7" ]
        | "outfile" -> [ "train"; "stage1"; "--tiny"; "--data"; data; "-o"; dir.File "afile" ]
        | _ -> [ "train"; "stage1"; "--resume"; data ]
    let code, out = CliTests.run args
    code |> should equal 2
    let errors = out.Split('\n') |> Array.filter (fun l -> l.StartsWith "error:")
    errors.Length |> should equal 1
    errors.[0] |> should haveSubstring expected
    out |> should not' (haveSubstring "   at ")
    Directory.Exists(dir.File "run") |> should be False

[<Fact>]
let ``custom preset: a Variant-6 ControlNet checkpoint builds a Variant-6 model, chosen from its metadata`` () =
    use _threads = oneThread ()
    use dir = new TempDir()
    let data = makeData (dir.File "hq") 1 false
    let o = tinyOptions "stage2" data "\"steps\": 1, \"batch_size\": 1, \"variant\": \"v6\""
    use trainer = Trainers.Create o
    let r = TrainRun(o, dir.File "run", Log = TextWriter.Null).Run(trainer, false, CancellationToken.None)
    // the frozen parts as an SD checkpoint (official prefixes) and the stage-1 model as a cleaner checkpoint
    let cldm = (trainer :?> Stage2Training).Cldm
    let sd = Collections.Generic.Dictionary<string, torch.Tensor>()
    for (m: torch.nn.Module), prefix in [ cldm.unet :> torch.nn.Module, "model.diffusion_model."; cldm.vae, "first_stage_model."; cldm.clip, "cond_stage_model." ] do
        for kv in m.state_dict() do sd.[prefix + kv.Key] <- kv.Value
    SafeTensors.Save(dir.File "sd.safetensors", sd)
    use swin = new DiffBIR.Lab.Models.Stage1.SwinIR(Trainers.TinySwinIR)
    TrainingCheckpoint.Save(swin, dir.File "swinir.safetensors", 0L)
    let custom =
        DiffBIR.Lab.Pipeline.CustomCheckpoints(dir.File "sd.safetensors", dir.File "swinir.safetensors", r.LastCheckpoint,
                                               CleanerConfig = Trainers.TinySwinIR, CldmConfig = Trainers.TinyCldm ControlMode.Add)
    use p = DiffBIR.Lab.Pipeline.Presets.Build("custom", "sr", fixturesDir, DiffBIR.Lab.Pipeline.BuildOptions(Custom = custom))
    p.Pipeline.Cldm.controlnet.Mode |> should equal ControlMode.Sft
    // the trained weights, γ convs included, are what was loaded
    let loaded = p.Pipeline.Cldm.controlnet.state_dict()
    for kv in trainer.Trainable.state_dict() do (kv.Value - loaded.[kv.Key]).abs().max().item<float32>() |> should equal 0.0f

[<Fact>]
let ``prior: the loss falls over 50 steps and only the UNet learns`` () =
    use _threads = oneThread ()
    use dir = new TempDir()
    let data = makeData (dir.File "hq") 2 false
    let o = tinyOptions "prior" data "\"steps\": 50, \"batch_size\": 1, \"lr\": 1e-3, \"p_empty\": 0"
    use trainer = Trainers.Create o
    trainer.Stage |> should equal "prior"
    let run = TrainRun(o, dir.File "run", Log = TextWriter.Null)
    let r = run.Run(trainer, false, CancellationToken.None)
    let losses = r.Metrics |> Seq.map (fun m -> m.Loss) |> List.ofSeq
    let first, last = meanOf losses.[0..9], meanOf losses.[40..49]
    Assert.True(last < 0.8 * first, sprintf "prior: mean loss of steps 1-10 %.4f, of steps 41-50 %.4f: %A" first last losses)
    // the checkpoint is the UNet's state dict (official key names of the diffusion model)
    let w = SafeTensors.Load(dir.File "run/checkpoints/step_50.safetensors").Tensors
    w.Keys |> Seq.exists (fun k -> k.StartsWith "input_blocks.") |> should be True
    w.Keys |> Seq.exists (fun k -> k.StartsWith "zero_convs.") |> should be False

[<Fact>]
let ``prior: validation is refused with one line`` () =
    use dir = new TempDir()
    let data = makeData (dir.File "hq") 1 false
    let code, out = CliTests.run [ "train"; "prior"; "--tiny"; "--data"; data; "--val"; data; "-o"; dir.File "run" ]
    code |> should equal 2
    out |> should haveSubstring "--val"
    Directory.Exists(dir.File "run") |> should be False
