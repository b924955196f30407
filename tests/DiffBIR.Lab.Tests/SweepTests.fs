/// Conditioning as a value (Condition once, Sample many) and the sweep engine: results table, resume, shards, CLI.
module DiffBIR.Lab.Tests.SweepTests

open System
open System.IO
open Xunit
open FsUnit.Xunit
open TorchSharp
open DiffBIR.Lab.Pipeline
open DiffBIR.Lab.Guidance
open DiffBIR.Lab.Tests.TestSupport

/// A 32×32 test image with structure (gradients and a square), uint8 [1, 32, 32, 3].
let testImage () =
    let y = torch.arange(32L).to_type(torch.ScalarType.Float32).view(32L, 1L).expand(32L, 32L)
    let x = torch.arange(32L).to_type(torch.ScalarType.Float32).view(1L, 32L).expand(32L, 32L)
    let square = ((y.gt(torch.tensor 8.0f)).logical_and(y.lt(torch.tensor 20.0f)).logical_and(x.gt(torch.tensor 10.0f)).logical_and(x.lt(torch.tensor 24.0f))).to_type(torch.ScalarType.Float32)
    torch.stack([| y * 8.0f; x * 8.0f; square * 255.0f |], 2).to_type(torch.ScalarType.Byte).unsqueeze(0L)

/// Stage 1 that counts its calls (wraps the tiny preset's cleaner).
type CountingCleaner(inner: Cleaner) =
    inherit Cleaner(inner.Network)
    member val Calls = 0 with get, set
    override _.Kind = inner.Kind
    override _.OutputSize(h, w) = inner.OutputSize(h, w)
    override this.Apply(lq, tiled, tileSize, tileStride) =
        this.Calls <- this.Calls + 1
        inner.Apply(lq, tiled, tileSize, tileStride)

let private guidanceSettings =
    [ WeightedMseGuidance(Scale = 0.1, PatchSize = 2) :> RestorationGuidance
      WeightedMseGuidance(Scale = 0.5, PatchSize = 4)
      MseGuidance(Scale = 1.0) ]

let private sameTensor (a: torch.Tensor) (b: torch.Tensor) = a.shape = b.shape && a.equal(b).all().item<bool>()

[<Fact>]
let ``a sweep of guidance settings on one input runs stage 1, the VAE encoder and CLIP exactly once`` () =
    use preset = Presets.Build("tiny", "sr", fixturesDir)
    let inner = preset.Pipeline.Cleaner
    let counting = new CountingCleaner(inner, ConditionShortEdge = inner.ConditionShortEdge)
    let pipe = new RestorationPipeline(counting, preset.Pipeline.Cldm, preset.Pipeline.Schedule)
    use lq = testImage ()
    let options = [ for g in guidanceSettings -> PipelineOptions(Steps = 2, Seed = 11L, Guidance = g) ]
    // references: each setting restored on its own (stage 1 + encoder + CLIP every time)
    let reference = [ for o in options -> pipe.Run(lq, o) ]
    counting.Calls |> should equal options.Length
    counting.Calls <- 0
    let events = ResizeArray<string>()
    let observe = Action<PipelineEvent>(fun e -> events.Add e.Stage)
    use condition = pipe.Condition(lq, options.Head, observe)
    // From here on CLIP and the VAE encoder are poisoned: any use of them would make c_txt / c_img NaN and the
    // results differ from the references (rgb-space guidance decodes only; the decoder is left alone).
    use _ng = torch.no_grad()
    for p in preset.Pipeline.Cldm.clip.parameters() do p.fill_(nan) |> ignore
    for struct (name, p) in preset.Pipeline.Cldm.vae.named_parameters() do
        if name.StartsWith "encoder." || name.StartsWith "quant_conv." then p.fill_(nan) |> ignore
    let mutable stepCount = 0
    let results =
        [ for o in options ->
            pipe.Sample(condition, o, observe, Func<DiffBIR.Lab.Sampling.StepInfo, bool>(fun _ -> stepCount <- stepCount + 1; true)) ]
    counting.Calls |> should equal 1
    events |> Seq.filter (fun s -> s = "stage1") |> Seq.length |> should equal 1
    events |> Seq.filter (fun s -> s = "c_txt" || s = "uc_txt" || s = "c_img") |> Seq.length |> should equal 3
    events |> Seq.filter (fun s -> s = "image") |> Seq.length |> should equal options.Length
    stepCount |> should equal (2 * options.Length)
    for (r, ref') in List.zip results reference do
        sameTensor r.Image ref'.Image |> should be True
        sameTensor r.Z ref'.Z |> should be True
        sameTensor r.CText ref'.CText |> should be True
    // the settings really differ (the comparison can fail)
    sameTensor results.[0].Z results.[1].Z |> should be False
    for r in results @ reference do r.Dispose()

[<Fact>]
let ``Sample refuses options that change the conditioning and names the option`` () =
    use preset = Presets.Build("tiny", "sr", fixturesDir)
    use lq = testImage ()
    let o = PipelineOptions(Steps = 1, Seed = 3L)
    use condition = preset.Condition(lq, o)
    let ex = Assert.Throws<ArgumentException>(fun () -> preset.Sample(condition, PipelineOptions(Steps = 1, Seed = 3L, PosPrompt = "a photo")) |> ignore)
    ex.Message |> should haveSubstring "PosPrompt"
    let ex2 = Assert.Throws<ArgumentException>(fun () -> preset.Sample(condition, PipelineOptions(Steps = 1, CleanerTiled = true)) |> ignore)
    ex2.Message |> should haveSubstring "CleanerTiled"
    // sampling-only options are fine, and disposing a result leaves the condition usable
    (use r = preset.Sample(condition, PipelineOptions(Steps = 1, Seed = 4L, CfgScale = 2.0, Sampler = "edm_euler")) in r.Image.shape |> should equal [| 1L; 128L; 128L; 3L |])
    use again = preset.Sample(condition, o)
    use whole = preset.Restore(lq, o)
    sameTensor again.Image whole.Image |> should be True
