/// The official pipeline's pre/post-processing and tiling primitives, checked against the end-to-end fixtures.
module DiffBIR.Lab.Tests.PipelineTests

open System.IO
open System.Text.Json.Nodes
open Xunit
open FsUnit.Xunit
open TorchSharp
open DiffBIR.Lab.IO
open DiffBIR.Lab.Parity
open DiffBIR.Lab.Pipeline
open DiffBIR.Lab.Checkpoints
open DiffBIR.Lab.Models.Stage1
open DiffBIR.Lab.Tests.TestSupport

[<Fact>]
let ``sliding windows end flush with the border, as the official ones`` () =
    use fx = Fixture.Load(fixture "v2.0.0/tiled.safetensors")
    // metadata: sliding_windows(14, 12, 8, 4)
    let ours = Tiling.SlidingWindows(14, 12, 8, 4) |> Seq.collect (fun t -> [ int64 t.Top; int64 t.Bottom; int64 t.Left; int64 t.Right ]) |> Array.ofSeq
    fx.Out("sliding_windows").flatten().data<int64>().ToArray() |> should equal ours

[<Fact>]
let ``gaussian tile weights equal the official float64 values, asymmetric midpoint included`` () =
    use fx = Fixture.Load(fixture "v2.0.0/tiled.safetensors")
    use ours = Tiling.GaussianWeightsTensor(8, 8, torch.ScalarType.Float64)
    let r = ParityRunner.Compare("w", ours.squeeze(), fx.Out "gaussian_weights_f64", Tolerance(1e-14, 0.0))
    Assert.True(r.Pass, sprintf "max_rel %g" r.MaxRel)

[<Fact>]
let ``tiled application of the identity returns the input`` () =
    use x = torch.randn(1L, 3L, 37L, 53L)
    use y = Tiling.Apply(x, (fun t _ -> t.clone()), 16, 8)
    (y - x).abs().max().item<float32>() |> should be (lessThan 1e-5f)

[<Fact>]
let ``padding to multiples of 64 pads bottom and right with zeros`` () =
    use x = torch.ones(1L, 3L, 65L, 64L)
    use y = ImageOps.PadToMultiplesOf(x, 64)
    y.shape |> should equal [| 1L; 3L; 128L; 64L |]
    y.[0L, 0L, 127L, 0L].item<float32>() |> should equal 0.0f
    y.sum().item<float32>() |> should equal (3.0f * 65.0f * 64.0f)

/// v2 BSR, end of the pipeline: crop the decoded sample, colour-fix it against the stage-1 output, resize to
/// (H·upscale, W·upscale) and truncate to uint8 — from the fixture's own intermediate tensors.
[<Fact>]
let ``post-processing reproduces the official e2e image from its decoded sample`` () =
    use fx = Fixture.Load(fixture "e2e_bsr_v2.safetensors")
    let stage1 = fx.Out "untiled.stage1"
    let decoded = fx.Out "untiled.decoded"
    let h0, w0 = stage1.shape.[2], stage1.shape.[3]
    use cropped = decoded.narrow(2, 0, h0).narrow(3, 0, w0)
    let lq = fx.In "lq"
    use img = ImageOps.Finish(cropped, stage1, lq.shape.[1] * 2L, lq.shape.[2] * 2L)
    let expected = fx.Out "untiled.image"
    img.shape |> should equal expected.shape
    let diff = (img.to_type(torch.ScalarType.Int32) - expected.to_type(torch.ScalarType.Int32)).abs()
    diff.max().item<int>() |> should be (lessThanOrEqualTo 1)
    (diff.gt(torch.tensor 0).sum().item<int64>()) |> should be (lessThan 10L)

/// v2 BSR, start of the pipeline: lq/255 → BSRNet ×4 → short edge to 512 (bicubic, antialiased) = out.untiled.stage1.
[<Fact>]
let ``stage 1 of the v2 pipeline reproduces the official condition image`` () =
    use fx = Fixture.Load(fixture "e2e_bsr_v2.safetensors")
    let cfg = RRDBNetConfig.FromJson(fx.Config.["cleaner"])
    use net = new RRDBNet(cfg)
    StateDictLoader.Load(net, fx.Weights "cleaner") |> ignore
    net.eval()
    use _ng = torch.no_grad()
    use lq = ImageIO.FromUInt8(fx.In "lq")
    use restored = net.forward(lq)
    use stage1 = ImageOps.ResizeShortEdgeTo(restored, 512)
    let r = ParityRunner.Compare("stage1", stage1, fx.Out "untiled.stage1", Tolerance(1e-5, 0.0))
    Assert.True(r.Pass, sprintf "max_abs %g max_rel %g" r.MaxAbs r.MaxRel)

[<Fact>]
let ``identical images score the official 80 dB cap and SSIM 1`` () =
    use x = torch.rand(2L, 3L, 32L, 32L, dtype = torch.ScalarType.Float64)
    let psnr = DiffBIR.Lab.Metrics.ImageMetrics.Psnr(x, x)
    psnr.shape |> should equal [| 2L |]
    psnr.[0L].item<float>() |> should (equalWithin 1e-9) 80.0
    DiffBIR.Lab.Metrics.ImageMetrics.Ssim(x, x).[1L].item<float>() |> should (equalWithin 1e-12) 1.0

[<Fact>]
let ``metrics match the official code and skimage on every fixture pair`` () =
    let r = assertParity "metrics.safetensors"
    r.Outputs.Count |> should equal 78
