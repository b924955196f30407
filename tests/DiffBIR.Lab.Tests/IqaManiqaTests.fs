/// pyiqa MANIQA (no-reference IQA): the full-size released layout, that the parity comparison can fail, and what a
/// user hits: batches, odd sizes that trigger the 225/min(H, W) resize, grey input, out-of-range input.
/// (Parity of iqa/maniqa.safetensors itself runs in ParityTests, one theory per fixture file.)
module DiffBIR.Lab.Tests.IqaManiqaTests

open System
open Xunit
open FsUnit.Xunit
open TorchSharp
open DiffBIR.Lab.Parity
open DiffBIR.Lab.Parity.Cases
open DiffBIR.Lab.Metrics.Maniqa
open DiffBIR.Lab.Tests.TestSupport

let private fixtureFile = "iqa/maniqa.safetensors"

/// The reduced fixture model with its weights loaded strictly, and the fixture (for inputs / expected values).
let private tiny () =
    let fx = Fixture.Load(fixture fixtureFile)
    let m = new ManiqaMetric(ManiqaConfig.FromJson fx.Config)
    m.LoadStateDict(fx.Weights(), true, fixtureFile) |> ignore
    m, fx

let private relDiff (a: torch.Tensor) (b: torch.Tensor) =
    use a64 = a.to_type(torch.ScalarType.Float64)
    use b64 = b.to_type(torch.ScalarType.Float64)
    (a64 - b64).abs().max().item<float>() / b64.abs().max().item<float>()

// ---- the released layout ----------------------------------------------------------------------------------------

[<Fact>]
let ``full-size MANIQA (ViT-B/8 with its unused head, 2 stages, Swin buffers) has exactly the keys and shapes of ckpt_koniq10k.pt`` () =
    let r = assertParity "iqa/schema/maniqa.json"
    r.Outputs |> Seq.map (fun o -> o.Name) |> should contain "values (summary.json)"

[<Fact>]
let ``the released presets: koniq and kadid scale the Swin residual by 0.8, pipal by the class default 0.13`` () =
    ManiqaConfig.Koniq.Scale |> should equal 0.8
    ManiqaConfig.Kadid.Scale |> should equal 0.8
    ManiqaConfig.Pipal.Scale |> should equal 0.13
    ManiqaConfig.Koniq.InputSize |> should equal 28
    ManiqaConfig.Koniq.Vit |> should equal VitConfig.VitBase8

// ---- the comparison can fail ------------------------------------------------------------------------------------

/// The official case on a fixture whose ViT block-8 MLP bias is off by 1e-2 and whose run-b image is 1 % darker:
/// every output downstream of a change must fail, everything upstream must still pass.
type private PerturbedManiqa() =
    interface IParityCase with
        member _.Case = "maniqa"
        member _.Description = "MANIQA with a wrong weight and a wrong input"
        member _.DefaultTolerance = (IqaManiqaCase() :> IParityCase).DefaultTolerance
        member _.Run f =
            f.Tensors.["weights.vit.blocks.8.mlp.fc2.bias"].add_(torch.tensor(1e-2f)) |> ignore
            f.Tensors.["in.b.x"].mul_(torch.tensor(0.99f)) |> ignore
            (IqaManiqaCase() :> IParityCase).Run f

[<Fact>]
let ``a wrong weight or a wrong input makes exactly the outputs downstream of it fail`` () =
    let r = ParityRunner([ PerturbedManiqa() :> IParityCase ]).RunFile(fixture fixtureFile)
    r.Status |> should equal CaseStatus.Fail
    let pass name = (r.Outputs |> Seq.find (fun o -> o.Name = name)).Pass
    // weight of block 8: blocks 0..7 and the preprocessing are untouched, block 9 and everything after are not
    pass "a.crop0" |> should be True
    pass "a.vit6_crop0" |> should be True
    pass "a.vit9_crop0" |> should be False
    pass "a.score" |> should be False
    // input of run b: its crops are wrong from the start
    pass "b.crop_offsets" |> should be True
    pass "b.crop0" |> should be False
    pass "b.vit6_crop0" |> should be False
    pass "b.score" |> should be False

// ---- what a user hits -------------------------------------------------------------------------------------------

[<Fact>]
let ``a batch of two scores each image as alone, and as the official batched forward does`` () =
    let m, fx = tiny ()
    use _m = m
    use _fx = fx
    let a = fx.In("a.x")
    use b = a.flip(3L).contiguous()
    use batch = torch.cat([| a; b |], 0L)
    use s = m.Score(batch)
    s.shape |> should equal [| 2L; 1L |]
    use sa = m.Score(a)
    use sb = m.Score(b)
    // Score runs image by image: bit-identical to single calls.
    s.[0L].item<float32>() |> should equal (sa.[0L].item<float32>())
    s.[1L].item<float32>() |> should equal (sb.[0L].item<float32>())
    // The whole batch at once (crops b·20 + k, pooling per image) is the official layout: same scores up to rounding.
    let trace = m.Trace(batch)
    trace.Crops.shape |> should equal [| 40L; 3L; 224L; 224L |]
    trace.PerPatchScore.shape |> should equal [| 2L; 20L * 16L * 16L |]
    relDiff trace.Score s |> should be (lessThan 1e-5)
    // and the single image is the fixture's (band 8.4e-5 f32 vs f64)
    relDiff sa (fx.Out("a.score")) |> should be (lessThan 4e-4)
    (sa - sb).abs().item<float32>() |> should be (greaterThan 1e-4f)

[<Fact>]
let ``an odd size is resized by 225 over its shorter side and cropped 20 times; grey input equals its RGB copy`` () =
    let m, fx = tiny ()
    use _m = m
    use _fx = fx
    // 37×51 grey: sf = 225/37, so 225 × floor(51·225/37) = 225 × 310 before cropping
    use rgb = fx.In("b.x").narrow(2L, 11L, 37L).narrow(3L, 5L, 51L).contiguous()
    use grey = rgb.mean([| 1L |], true)
    let trace = m.Trace(grey)
    trace.Resized.shape |> should equal [| 1L; 3L; 225L; 310L |]
    let offsets = trace.CropOffsets.data<int64>().ToArray()
    // step_h = (225-224)//4 = 0, step_w = (310-224)//4 = 21; i = 0..3, j = 0..4, first 20
    offsets |> should equal [| for i in 0L .. 3L do for j in 0L .. 4L do yield i * 0L; yield j * 21L |]
    use s = m.Score(grey)
    s.shape |> should equal [| 1L; 1L |]
    Single.IsFinite(s.item<float32>()) |> should be True
    use s3 = m.Score(grey.expand(1L, 3L, 37L, 51L).contiguous())
    s.item<float32>() |> should equal (s3.item<float32>())

[<Fact>]
let ``input outside [0, 1], of the wrong rank or with 2 channels is refused as pyiqa refuses it`` () =
    let m, fx = tiny ()
    use _m = m
    use _fx = fx
    let a = fx.In("a.x")
    (fun () -> m.Score(a.mul(torch.tensor(1.5f))) |> ignore) |> should throw typeof<ArgumentException>
    (fun () -> m.Score(a.[0L]) |> ignore) |> should throw typeof<ArgumentException>
    (fun () -> m.Score(a.narrow(1L, 0L, 2L)) |> ignore) |> should throw typeof<ArgumentException>

/// Bilinear (align_corners=False) interpolation matrix [out, in] with PyTorch's source index max(0, (dst + 0.5)/sf − 0.5).
let private bilinearMatrix (inSize: int) (outSize: int) (sf: float) =
    let m = Array.zeroCreate<float> (outSize * inSize)
    for d in 0 .. outSize - 1 do
        let src = max 0.0 ((float d + 0.5) / sf - 0.5)
        let i0 = int src
        let i1 = if i0 < inSize - 1 then i0 + 1 else i0
        let l = src - float i0
        m.[d * inSize + i0] <- m.[d * inSize + i0] + (1.0 - l)
        m.[d * inSize + i1] <- m.[d * inSize + i1] + l
    torch.tensor(m, torch.ScalarType.Float64).reshape(int64 outSize, int64 inSize)

[<Fact>]
let ``the resize keeps the given factor 225/min for its source coordinates, not the output over input size`` () =
    use fx = Fixture.Load(fixture fixtureFile)
    // 37×51: sf = 225/37 gives 225 × 310, but 310/51 ≠ 225/37, so the two conventions differ along the width.
    use x = fx.In("b.x").narrow(2L, 11L, 37L).narrow(3L, 5L, 51L).contiguous()
    use resized = ManiqaMetric.Preprocess(x)
    resized.shape |> should equal [| 1L; 3L; 225L; 310L |]
    use xn = (x.to_type(torch.ScalarType.Float64) - 0.5) / 0.5
    let sf = 225.0 / 37.0
    let expectedWith (sfW: float) =
        let ww: torch.Tensor = bilinearMatrix 51 310 sfW
        torch.matmul(torch.matmul(bilinearMatrix 37 225 sf, xn), ww.t())
    use given = expectedWith sf
    use bySize = expectedWith (310.0 / 51.0)
    relDiff (resized.to_type(torch.ScalarType.Float64)) given |> should be (lessThan 1e-5)
    relDiff bySize given |> should be (greaterThan 1e-3)
