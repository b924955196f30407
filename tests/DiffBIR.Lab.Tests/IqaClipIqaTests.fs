/// pyiqa's CLIP-IQA / CLIP-IQA+ (OpenAI CLIP RN50 backbone): parity with the official code, the full-size schemas,
/// and what a user of the metric meets (batches, odd sizes, gray images, the input range, learned-prompt loading).
module DiffBIR.Lab.Tests.IqaClipIqaTests

open System.Collections.Generic
open Xunit
open FsUnit.Xunit
open TorchSharp
open DiffBIR.Lab.Parity
open DiffBIR.Lab.Parity.Cases
open DiffBIR.Lab.Metrics.ClipIqa
open DiffBIR.Lab.Models.Clip
open DiffBIR.Lab.Tests.TestSupport

let private fixtureFile = "iqa/clipiqa.safetensors"
let private tokenizer = lazy ClipTokenizer(fixture "bpe_simple_vocab_16e6.txt.gz")

/// The fixture's run (a / b / c) as a loaded metric, with optionally edited weights.
let private metricOf (fx: Fixture) (run: string) (edit: Dictionary<string, torch.Tensor> -> unit) =
    let cfg = fx.Config
    let mc = ClipIqaConfig.FromJson(cfg.["metric_opts"].[run], cfg.["clip"])
    let w = ClipIqaCase.WeightsWithTokenEmbedding(fx, mc.Clip)
    if not mc.UsesPromptLearner then
        for k in List.ofSeq w.Keys do if k.StartsWith "prompt_learner." then w.Remove k |> ignore
    edit w
    let m = new ClipIqaMetric(mc, fx.In "prompt_tokens", (if mc.UsesPromptLearner then fx.In "plus_tokenized_prompts" else null))
    m.LoadStateDict(w)
    m

/// Same shape and every element equal (Tensor.equal is element-wise in TorchSharp).
let private identical (a: torch.Tensor) (b: torch.Tensor) = a.shape = b.shape && a.eq(b).all().item<bool>()

let private scoreVs (fx: Fixture) (run: string) (actual: torch.Tensor) =
    ParityRunner.Compare(run + ".score", actual, fx.Out(run + ".score"), ClipIqaCase.Band(fx, run + ".score"))

// ---- parity with the official code ------------------------------------------------------------------------------

[<Fact>]
let ``CLIP-IQA and CLIP-IQA+: ResNet stages, features, logits, pair probabilities and score match pyiqa`` () =
    let report = assertParity fixtureFile
    // 3 checks (token embedding, 2 tokenizations) + 10 + 11 + 11 outputs of runs a, b, c.
    report.Outputs.Count |> should equal 35

[<Fact>]
let ``full-size OpenAI CLIP RN50 has exactly the 489 keys and shapes build_model makes`` () =
    assertParity "iqa/schema/clip_rn50.json" |> ignore

[<Fact>]
let ``full-size CLIPIQA('clipiqa+') state dict is the prompt learner only; 'clipiqa' has an empty one`` () =
    assertParity "iqa/schema/clipiqa_plus.json" |> ignore
    let struct (_, keys, _) =
        SchemaCase.Measure(fun () ->
            new ClipIqaMetric(ClipIqaConfig.ClipIqa, torch.zeros(10L, 77L, dtype = torch.int64), null) :> torch.nn.Module)
    keys |> should equal 0L

// ---- the comparison can fail ------------------------------------------------------------------------------------

[<Fact>]
let ``a wrong weight, a wrong input or a wrong flag makes the score comparison fail`` () =
    use fx = Fixture.Load(fixture fixtureFile)
    use _ = torch.no_grad()
    // Right weights and input pass (the baseline of this test).
    use good = metricOf fx "a" ignore
    (scoreVs fx "a" (good.Score(fx.In "a.x"))).Pass |> should be True
    // One BatchNorm running variance off by 1 %.
    use wrongW = metricOf fx "a" (fun w -> w.["visual.layer2.0.bn2.running_var"] <- w.["visual.layer2.0.bn2.running_var"] * 1.01f)
    (scoreVs fx "a" (wrongW.Score(fx.In "a.x"))).Pass |> should be False
    // The token embedding drawn with another seed.
    use wrongE = metricOf fx "a" (fun w -> w.["token_embedding.weight"] <- CounterInit.ClipTokenEmbedding(1235L, 49408L, 128L))
    (scoreVs fx "a" (wrongE.Score(fx.In "a.x"))).Pass |> should be False
    // The image mirrored.
    (scoreVs fx "a" (good.Score(fx.In("a.x").flip(3L)))).Pass |> should be False
    // Run a's image with run b's pos_embedding=True.
    use posOn = metricOf fx "b" ignore
    (scoreVs fx "a" (posOn.Score(fx.In "a.x"))).Pass |> should be False
    // CLIP-IQA+ with the learned context of the other prompt.
    use swapped = metricOf fx "c" (fun w -> w.["prompt_learner.ctx"] <- w.["prompt_learner.ctx"].flip(0L))
    let r = ParityRunner.Compare("c.text_features", swapped.Evaluate(fx.In "c.x").TextFeatures, fx.Out "c.text_features", ClipIqaCase.Band(fx, "c.text_features"))
    r.Pass |> should be False

// ---- what a user meets ------------------------------------------------------------------------------------------

[<Fact>]
let ``a batch of two scores each image as it scores alone, at an odd size too`` () =
    use fx = Fixture.Load(fixture fixtureFile)
    use _ = torch.no_grad()
    for run in [ "a"; "b"; "c" ] do
        use m = metricOf fx run ignore
        let x1 = fx.In "a.x"
        let x2 = fx.In "c.x"
        use both = m.Score(torch.cat([| x1; x2 |], 0L))
        both.shape |> should equal [| 2L; 1L |]
        use s1 = m.Score x1
        use s2 = m.Score x2
        (both - torch.cat([| s1; s2 |], 0L)).abs().max().item<float32>() |> should be (lessThan 1e-6f)
        // 37 × 53: odd sides, every AvgPool floors (and b resamples its positional embedding to 2·1 + 1 tokens).
        let odd1 = x1.narrow(2L, 0L, 37L).narrow(3L, 0L, 53L)
        let odd2 = x2.narrow(2L, 5L, 37L).narrow(3L, 3L, 53L)
        use bothOdd = m.Score(torch.cat([| odd1; odd2 |], 0L))
        use o1 = m.Score odd1
        use o2 = m.Score odd2
        (bothOdd - torch.cat([| o1; o2 |], 0L)).abs().max().item<float32>() |> should be (lessThan 1e-6f)
        let lo, hi = bothOdd.min().item<float32>(), bothOdd.max().item<float32>()
        (lo > 0.0f && hi < 1.0f) |> should be True

[<Fact>]
let ``the input must be in [0, 1] with pyiqa's 1e-6 slack, 4-D, 1 or 3 channels, at least 31 px a side; float64 runs as float32`` () =
    use fx = Fixture.Load(fixture fixtureFile)
    use m = metricOf fx "a" ignore
    let x = fx.In "a.x"
    let withPixel (v: float32) =
        let t = x.clone()
        t.[0L, 1L, 2L, 3L] <- torch.tensor v
        t
    (fun () -> m.Score(withPixel 1.000002f) |> ignore) |> should throw typeof<System.ArgumentException>
    (fun () -> m.Score(withPixel -0.000002f) |> ignore) |> should throw typeof<System.ArgumentException>
    use inSlack = m.Score(withPixel -0.0000005f)
    inSlack.shape |> should equal [| 1L; 1L |]
    (fun () -> m.Score(x.squeeze(0L)) |> ignore) |> should throw typeof<System.ArgumentException>
    (fun () -> m.Score(torch.cat([| x; x.narrow(1L, 0L, 1L) |], 1L)) |> ignore) |> should throw typeof<System.ArgumentException>
    (fun () -> m.Score(x.narrow(2L, 0L, 30L)) |> ignore) |> should throw typeof<System.ArgumentException>
    // 1 + 5e-7 is accepted (pyiqa's x.max() < 1 + 1e-6); 31 px works.
    use edge = m.Score((withPixel 1.0000005f).narrow(2L, 0L, 31L))
    edge.shape |> should equal [| 1L; 1L |]
    // float64 input is computed in float32 (pyiqa's float32-casting LayerNorm cannot run CLIP in float64).
    use s32 = m.Score x
    use s64 = m.Score(x.to_type(torch.float64))
    identical s32 s64 |> should be True

[<Fact>]
let ``a gray image is broadcast against the 3-channel mean and std, as pyiqa does`` () =
    use fx = Fixture.Load(fixture fixtureFile)
    use m = metricOf fx "a" ignore
    let gray = fx.In("a.x").narrow(1L, 1L, 1L)
    use s = m.Score gray
    use s3 = m.Score(gray.expand(1L, 3L, -1L, -1L))
    s.shape |> should equal [| 1L; 1L |]
    (s - s3).abs().item<float32>() |> should equal 0.0f

// ---- prompts and weights ----------------------------------------------------------------------------------------

[<Fact>]
let ``our BPE tokenizer gives the official prompt ids; '..' is one token and the class tokens are good/bad, photo, ..`` () =
    use fx = Fixture.Load(fixture fixtureFile)
    let tok = tokenizer.Force()
    use ids = tok.Tokenize(ClipIqaPrompts.Pairs, 77)
    identical ids (fx.In("prompt_tokens").to_type(torch.int64)) |> should be True
    use plus = tok.Tokenize(ClipIqaPrompts.PlusInitPrompts(), 77)
    identical plus (fx.In("plus_tokenized_prompts").to_type(torch.int64)) |> should be True
    // SOT, 16 × 'X', then the 3 class tokens PromptLearner cuts out (name_lens = 3), then EOT.
    let row (i: int64) = plus.[i].data<int64>().ToArray()
    row 0L |> Array.skip 17 |> Array.take 4 |> should equal [| 886L; 1125L; 852L; int64 ClipTokenizer.EndOfText |]
    row 1L |> Array.skip 17 |> Array.take 4 |> should equal [| 2103L; 1125L; 852L; int64 ClipTokenizer.EndOfText |]

[<Fact>]
let ``the metric built with the tokenizer scores as the one built from the fixture's token ids`` () =
    use fx = Fixture.Load(fixture fixtureFile)
    use _ = torch.no_grad()
    use fromIds = metricOf fx "c" ignore
    let mc = ClipIqaConfig.FromJson(fx.Config.["metric_opts"].["c"], fx.Config.["clip"])
    use fromTok = new ClipIqaMetric(mc, tokenizer.Force())
    fromTok.LoadStateDict(ClipIqaCase.WeightsWithTokenEmbedding(fx, mc.Clip))
    (fromTok.Score(fx.In "c.x") - fromIds.Score(fx.In "c.x")).abs().item<float32>() |> should equal 0.0f

[<Fact>]
let ``CLIP-IQA+ computes token_prefix and token_suffix from the token embedding when given only the learned ctx`` () =
    use fx = Fixture.Load(fixture fixtureFile)
    use _ = torch.no_grad()
    // The released CLIP-IQA+ file is a bare ctx tensor: load CLIP + prompt_learner.ctx only.
    use m = metricOf fx "c" (fun w -> w.Remove "prompt_learner.token_prefix" |> ignore; w.Remove "prompt_learner.token_suffix" |> ignore)
    let sd = m.state_dict()
    identical sd.["prompt_learner.token_prefix"] (fx.Get "weights.prompt_learner.token_prefix") |> should be True
    identical sd.["prompt_learner.token_suffix"] (fx.Get "weights.prompt_learner.token_suffix") |> should be True
    (scoreVs fx "c" (m.Score(fx.In "c.x"))).Pass |> should be True
    // ctx itself is learned: a strict load without it is refused.
    (fun () -> metricOf fx "c" (fun w -> w.Remove "prompt_learner.ctx" |> ignore) |> ignore)
    |> should throw typeof<DiffBIR.Lab.Checkpoints.StateDictMismatchException>
    // 'clipiqa' has no prompt learner: its keys are unexpected there.
    let mc = ClipIqaConfig.FromJson(fx.Config.["metric_opts"].["a"], fx.Config.["clip"])
    use plain = new ClipIqaMetric(mc, fx.In "prompt_tokens", null)
    (fun () -> plain.LoadStateDict(ClipIqaCase.WeightsWithTokenEmbedding(fx, mc.Clip)))
    |> should throw typeof<DiffBIR.Lab.Checkpoints.StateDictMismatchException>

[<Fact>]
let ``loading rounds Conv, Linear, attention projections and text_projection to float16 as clip.load does; norms stay float32`` () =
    use fx = Fixture.Load(fixture fixtureFile)
    let mc = ClipIqaConfig.FromJson(fx.Config.["metric_opts"].["a"], fx.Config.["clip"])
    use clip = new OpenAiClip(mc.Clip)
    let w = ClipIqaCase.WeightsWithTokenEmbedding(fx, mc.Clip)
    for k in List.ofSeq w.Keys do if k.StartsWith "prompt_learner." then w.Remove k |> ignore
    let bump = 1e-4f // below float16 resolution at these magnitudes for most values, far above float32's
    for k in [ "visual.conv1.weight"; "transformer.resblocks.0.attn.in_proj_weight"; "text_projection"; "visual.bn1.weight" ] do
        w.[k] <- w.[k] + bump
    clip.LoadStateDict(w) |> ignore
    let sd = clip.state_dict()
    let roundTrip (t: torch.Tensor) = t.to_type(torch.float16).to_type(torch.float32)
    for k in [ "visual.conv1.weight"; "transformer.resblocks.0.attn.in_proj_weight"; "text_projection" ] do
        identical sd.[k] (roundTrip w.[k]) |> should be True
        identical sd.[k] (w.[k]) |> should be False
    identical sd.["visual.bn1.weight"] (w.["visual.bn1.weight"]) |> should be True
    clip.HalfRoundedKeys() |> should contain "visual.attnpool.c_proj.bias"
    clip.HalfRoundedKeys() |> should not' (contain "positional_embedding")
    clip.HalfRoundedKeys() |> should not' (contain "token_embedding.weight")
