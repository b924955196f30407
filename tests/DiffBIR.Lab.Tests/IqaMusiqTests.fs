/// MUSIQ (pyiqa's multi-scale image quality transformer): parity with the official code, the full-size schemas, and
/// what a user of the metric meets (batches, odd sizes, the input range).
module DiffBIR.Lab.Tests.IqaMusiqTests

open System
open System.Text.Json.Nodes
open Xunit
open FsUnit.Xunit
open TorchSharp
open DiffBIR.Lab.Checkpoints
open DiffBIR.Lab.Parity
open DiffBIR.Lab.Parity.Cases
open DiffBIR.Lab.Metrics.Musiq
open DiffBIR.Lab.Tests.TestSupport

let private maxRel (a: torch.Tensor) (b: torch.Tensor) =
    ((a - b).abs().max().item<float32>() |> float) / (b.abs().max().item<float32>() |> float)

/// The tiny 'musiq' model of the fixture, with its stored weights.
let private fixtureModel (file: string) =
    use f = Fixture.Load(fixture file)
    let m = new MusiqModel(MusiqConfig.FromJson(f.Config.["metric_opts"]))
    StateDictLoader.Load(m, f.Weights(), strict = true, sourceName = f.Path) |> ignore
    m.eval()
    let x = f.In("a.x").clone()
    m, x

// ---- parity with the official code ------------------------------------------------------------------------------

[<Fact>]
let ``musiq: patches, hashed positions, masks, tokens, encoder, head and score match pyiqa for both runs`` () =
    let r = assertParity "iqa/musiq.safetensors"
    r.Outputs.Count |> should equal 17

[<Fact>]
let ``musiq-ava: 10-bin distribution and its mean score match pyiqa (unsorted lengths, original scale cut to 10)`` () =
    let r = assertParity "iqa/musiq_ava.safetensors"
    r.Outputs.Count |> should equal 17

[<Fact>]
let ``full-size MUSIQ (num_class 1) has exactly the keys and shapes of the released KonIQ checkpoint`` () =
    assertParity "iqa/schema/musiq.json" |> ignore

[<Fact>]
let ``full-size MUSIQ-AVA (num_class 10, head.0) has exactly the keys and shapes of the released AVA checkpoint`` () =
    assertParity "iqa/schema/musiq_ava.json" |> ignore

// ---- the comparison can fail ------------------------------------------------------------------------------------

/// The real case on a fixture altered before it runs.
type private PerturbedMusiq(perturb: Fixture -> unit) =
    interface IParityCase with
        member _.Case = "musiq"
        member _.Description = "perturbed fixture"
        member _.DefaultTolerance = (IqaMusiqCase() :> IParityCase).DefaultTolerance
        member _.Run f =
            perturb f
            (IqaMusiqCase() :> IParityCase).Run f

let private runPerturbed perturb =
    let r = ParityRunner([ PerturbedMusiq(perturb) :> IParityCase ]).RunFile(fixture "iqa/musiq.safetensors")
    let pass name = (r.Outputs |> Seq.find (fun o -> o.Name = name)).Pass
    r, pass

[<Fact>]
let ``a mirrored input image fails the score but keeps the positions and masks`` () =
    let r, pass = runPerturbed (fun f -> f.Tensors.["in.a.x"] <- f.Tensors.["in.a.x"].flip(3L))
    r.Status |> should equal CaseStatus.Fail
    pass "a.patches" |> should be False
    pass "a.score" |> should be False
    pass "a.spatial_positions" |> should be True
    pass "a.mask" |> should be True
    pass "b.score" |> should be True

[<Fact>]
let ``a wrong scale embedding of the original resolution fails the encoder output but not the stem tokens`` () =
    let key = "weights.transformer_encoder.scaleembed_input.scale_emb"
    let r, pass =
        runPerturbed (fun f ->
            let w = f.Tensors.[key].clone()
            // Scaled, not shifted: a constant shift of every channel would be removed by the LayerNorms.
            w.narrow(0L, 2L, 1L).mul_(torch.tensor(1.01f)) |> ignore
            f.Tensors.[key] <- w)
    r.Status |> should equal CaseStatus.Fail
    pass "a.tokens" |> should be True
    pass "a.encoded" |> should be False
    pass "a.score" |> should be False

// ---- what a user meets ------------------------------------------------------------------------------------------

[<Fact>]
let ``a batch of two scores each image as alone`` () =
    let m, x = fixtureModel "iqa/musiq.safetensors"
    use m = m
    use x = x
    use other = x.flip(2L)
    use batch = torch.cat([| x; other |], 0L)
    use both = m.Score(batch)
    use one = m.Score(x)
    use two = m.Score(other)
    both.shape |> should equal [| 2L; 1L |]
    maxRel (both.narrow(0L, 0L, 1L)) one |> should be (lessThan 1e-5)
    maxRel (both.narrow(0L, 1L, 1L)) two |> should be (lessThan 1e-5)
    (both.[0L, 0L].item<float32>() = both.[1L, 0L].item<float32>()) |> should be False

[<Fact>]
let ``an odd-sized image gives 49 + 144 + its own 2x2 patches, hashed to grid cells 0, 5, 50, 55`` () =
    let m, _ = fixtureModel "iqa/musiq.safetensors"
    use m = m
    use g = torch.Generator(7UL)
    use x = torch.rand([| 1L; 3L; 37L; 53L |], generator = g)
    use t = m.Trace(x)
    // 224 / 32 = 7 → 49 tokens; 384 / 32 = 12 → 144; the 37×53 original: ceil(37/32) × ceil(53/32) = 2×2.
    t.Patches.shape |> should equal [| 1L; 197L; 3075L |]
    let tail (v: torch.Tensor) = v.[0L].narrow(0L, 193L, 4L).data<int64>().ToArray()
    tail t.SpatialPositions |> should equal [| 0L; 5L; 50L; 55L |]
    tail t.ScalePositions |> should equal [| 2L; 2L; 2L; 2L |]
    tail t.Mask |> should equal [| 1L; 1L; 1L; 1L |]
    // 224 scale: 224×(53/…) resize of a 37×53 image is 156×224 → 5×7 = 35 real tokens then 14 padding tokens.
    let mask = t.Mask.[0L].data<int64>().ToArray()
    mask.[0..48] |> Array.sum |> should equal 35L
    Double.IsFinite(t.Score.item<float32>() |> float) |> should be True

[<Fact>]
let ``the resized side is Python's round, half to even`` () =
    use x = torch.zeros([| 1L; 3L; 5L; 8L |])
    // 5 · 4/8 = 2.5 → 2 (half to even); 8 · 4/8 = 4.
    let struct (r, rh, rw) = MusiqPatches.ResizePreserveAspectRatio(x, 5L, 8L, 4)
    use r = r
    (rh, rw) |> should equal (2L, 4L)
    r.shape |> should equal [| 1L; 3L; 2L; 4L |]

[<Fact>]
let ``an input outside [0, 1] is refused as pyiqa refuses it`` () =
    let m, x = fixtureModel "iqa/musiq_ava.safetensors"
    use m = m
    use x = x
    use bad = x * 255.0f
    (fun () -> m.Score(bad) |> ignore) |> should throw typeof<ArgumentException>

[<Fact>]
let ``the config follows the official constructor: pretrained 'ava' forces 10 classes, JSON null drops the original scale`` () =
    let parse (s: string) = MusiqConfig.FromJson(JsonNode.Parse s)
    (parse """{"type": "MUSIQ", "pretrained": "ava"}""").NumClass |> should equal 10
    (parse """{"type": "MUSIQ", "pretrained": "koniq10k"}""").NumClass |> should equal 1
    (parse """{"type": "MUSIQ"}""").NumClass |> should equal 10
    (parse """{"type": "MUSIQ", "pretrained": false, "max_seq_len_from_original_res": null}""").MaxSeqLenFromOriginalRes
    |> should equal (Nullable<int>())
    (fun () -> parse """{"type": "MUSIQ", "patch": 16}""" |> ignore) |> should throw typeof<ArgumentException>

[<Fact>]
let ``the full-size KonIQ model scores an odd-sized batch of two (random weights)`` () =
    use m = new MusiqModel(MusiqConfig.Koniq)
    m.eval()
    // Before any weights are loaded every GroupNorm is PyTorch's initial identity (TorchSharp leaves it uninitialised).
    for KeyValue(k, v) in m.state_dict() do
        if k.Contains "gn" then
            v.eq(torch.tensor(if k.EndsWith "weight" then 1.0f else 0.0f)).all().item<bool>() |> should be True
    use g = torch.Generator(11UL)
    use x = torch.rand([| 2L; 3L; 61L; 47L |], generator = g)
    use s = m.Score(x)
    s.shape |> should equal [| 2L; 1L |]
    s.isfinite().all().item<bool>() |> should be True
