/// The latent autoencoder (KL-f8) and the text condition (OpenCLIP ViT-H, penultimate layer, CLIP BPE tokenizer).
module DiffBIR.Lab.Tests.VaeClipTests

open System
open Xunit
open FsUnit.Xunit
open TorchSharp
open DiffBIR.Lab.Checkpoints
open DiffBIR.Lab.Parity
open DiffBIR.Lab.Models.Vae
open DiffBIR.Lab.Models.Clip
open DiffBIR.Lab.Tests.TestSupport

let private vocab = fixture "bpe_simple_vocab_16e6.txt.gz"
let private tokenizer = lazy ClipTokenizer(vocab)

let private maxAbsDiff (a: torch.Tensor) (b: torch.Tensor) = (a - b).abs().max().item<float32>() |> float

// ---- parity with the official code ------------------------------------------------------------------------------

[<Fact>]
let ``VAE: posterior, latent scaled by 0.18215 and both decodes match the official AutoencoderKL`` () =
    assertParity "vae.safetensors" |> ignore

[<Fact>]
let ``CLIP: the penultimate hidden state after ln_final matches FrozenOpenCLIPEmbedder`` () =
    assertParity "clip.safetensors" |> ignore

[<Fact>]
let ``tokenizer: BPE ids and 77-token rows match SimpleTokenizer for all 42 strings`` () =
    let report = assertParity "tokenizer.json"
    report.Outputs.Count |> should equal 84

[<Fact>]
let ``full-size VAE has exactly the keys and shapes of the released SD 2.1 VAE`` () =
    assertParity "schema/vae.json" |> ignore

[<Fact>]
let ``full-size text encoder has exactly the keys and shapes of OpenCLIP ViT-H (no visual, no attn_mask)`` () =
    assertParity "schema/clip.json" |> ignore

// ---- tokenizer rules ----------------------------------------------------------------------------------------------

[<Fact>]
let ``a short prompt is SOT, its ids, EOT, then zero padding to 77`` () =
    let tok = tokenizer.Force()
    let ids = tok.Encode "a photo of a cat" |> List.ofSeq
    let row = tok.TokenizeOne("a photo of a cat", 77)
    row.Length |> should equal 77
    row.[0] |> should equal (int64 ClipTokenizer.StartOfText)
    row.[1 .. ids.Length] |> Array.map int |> should equal (Array.ofList ids)
    row.[ids.Length + 1] |> should equal (int64 ClipTokenizer.EndOfText)
    row.[ids.Length + 2 ..] |> Array.forall ((=) 0L) |> should be True

[<Fact>]
let ``a prompt longer than 77 tokens is cut to 77 with the last id forced to EOT`` () =
    let tok = tokenizer.Force()
    let a = tok.Encode "a" |> Seq.exactlyOne |> int64
    // 100 words of one token each: SOT + 100 + EOT = 102 ids.
    let long = String.replicate 100 "a "
    let row = tok.TokenizeOne(long, 77)
    row.Length |> should equal 77
    row.[0] |> should equal (int64 ClipTokenizer.StartOfText)
    row.[1..75] |> Array.forall ((=) a) |> should be True
    row.[76] |> should equal (int64 ClipTokenizer.EndOfText)
    // Exactly 75 words still fit (SOT + 75 + EOT = 77); 76 words lose the 76th to the forced EOT.
    let fit = tok.TokenizeOne(String.replicate 75 "a ", 77)
    fit.[76] |> should equal (int64 ClipTokenizer.EndOfText)
    fit.[75] |> should equal a
    tok.TokenizeOne(String.replicate 76 "a ", 77) |> should equal row

[<Fact>]
let ``batch tokenization is an int64 [N, 77] tensor`` () =
    use t = tokenizer.Force().Tokenize([ ""; "a photo of a cat" ])
    t.shape |> should equal [| 2L; 77L |]
    t.dtype |> should equal torch.ScalarType.Int64
    t.[0L, 1L].item<int64>() |> should equal (int64 ClipTokenizer.EndOfText)

[<Fact>]
let ``cleaning unescapes HTML twice, collapses whitespace and lower-cases like Python`` () =
    ClipTokenizer.CleanText "&amp;amp;  Hello\t\nWORLD  " |> should equal "& hello world"
    ClipTokenizer.CleanText "&ampx &lt;b&gt;" |> should equal "&x <b>"
    // Python's str.lower(): final sigma and the dotted capital I.
    ClipTokenizer.CleanText "ΟΔΟΣ ΣΑΣ" |> should equal "οδος σας"
    ClipTokenizer.CleanText "İ" |> should equal "i\u0307"

[<Fact>]
let ``the pre-tokenizer splits contractions, letter runs, single digits and punctuation runs`` () =
    ClipTokenizer.PreTokenize "don't stop 2024!!" |> List.ofSeq
    |> should equal [ "don"; "'t"; "stop"; "2"; "0"; "2"; "4"; "!!" ]
    // Letters outside the BMP are letters (a .NET Regex would see surrogate halves).
    ClipTokenizer.PreTokenize "ab𝐀c 1" |> List.ofSeq |> should equal [ "ab𝐀c"; "1" ]

[<Fact>]
let ``decode inverts encode up to cleaning`` () =
    let tok = tokenizer.Force()
    tok.Decode(tok.Encode "A photo of a cat, 3:45pm!") |> should equal "a photo of a cat , 3 : 4 5 pm ! "

// ---- VAE ---------------------------------------------------------------------------------------------------------

[<Fact>]
let ``the posterior clamps log-variance to [-30, 20] before forming sigma`` () =
    use mean = torch.tensor([| 0.5f; -1.0f |]).reshape(1L, 2L, 1L, 1L)
    use logvar = torch.tensor([| -100.0f; 100.0f |]).reshape(1L, 2L, 1L, 1L)
    use moments = torch.cat([| mean; logvar |], 1L)
    use p = new DiagonalGaussianDistribution(moments)
    p.LogVar.flatten().data<float32>().ToArray() |> should equal [| -30.0f; 20.0f |]
    p.Std.flatten().data<float32>().ToArray() |> should equal [| float32 (exp -15.0); float32 (exp 10.0) |]
    p.Mode().flatten().data<float32>().ToArray() |> should equal [| 0.5f; -1.0f |]
    use noise = torch.tensor([| 2.0f; 0.0f |]).reshape(1L, 2L, 1L, 1L)
    use s = p.Sample(noise)
    s.flatten().data<float32>().ToArray() |> should equal [| 0.5f + 2.0f * float32 (exp -15.0); -1.0f |]

[<Fact>]
let ``DiffBIR's latent is the posterior mode times 0.18215 and decoding divides it back`` () =
    use fx = Fixture.Load(fixture "vae.safetensors")
    use vae = new AutoencoderKL(VaeConfig.FromJson fx.Config)
    StateDictLoader.Load(vae, fx.Weights()) |> ignore
    use _ = torch.no_grad()
    use p = vae.Encode(fx.In "x")
    use scaled = vae.EncodeScaled(fx.In "x")
    maxAbsDiff scaled (p.Mean * 0.18215) |> should equal 0.0
    use z = fx.In "z"
    use viaScaled = vae.DecodeScaled(z * 0.18215)
    use direct = vae.Decode(z)
    maxAbsDiff viaScaled direct |> should be (lessThan 1e-5)
    // 8× down-sampling for the full-size (4-level) VAE, 2× for this 2-level test config.
    scaled.shape |> should equal [| 1L; 4L; 16L; 16L |]

[<Fact>]
let ``a strict load names the missing and the unexpected key`` () =
    use fx = Fixture.Load(fixture "vae.safetensors")
    use vae = new AutoencoderKL(VaeConfig.FromJson fx.Config)
    let w = Collections.Generic.Dictionary<string, torch.Tensor>(fx.Weights())
    let t = w.["decoder.mid.attn_1.q.weight"]
    w.Remove "decoder.mid.attn_1.q.weight" |> ignore
    w.["decoder.mid.attn_1.query.weight"] <- t
    let ex = Assert.Throws<StateDictMismatchException>(fun () -> StateDictLoader.Load(vae, w, sourceName = "vae.safetensors") |> ignore)
    ex.Message |> should haveSubstring "decoder.mid.attn_1.q.weight"
    ex.Message |> should haveSubstring "decoder.mid.attn_1.query.weight"
    ex.Report.Missing |> List.ofSeq |> should equal [ "decoder.mid.attn_1.q.weight" ]
    ex.Report.Unexpected |> List.ofSeq |> should equal [ "decoder.mid.attn_1.query.weight" ]

// ---- CLIP text encoder -------------------------------------------------------------------------------------------

[<Fact>]
let ``the causal mask is a buffer that is not part of the state dict`` () =
    use clip = new FrozenOpenClipEmbedder(ClipConfig(Text = ClipTextConfig(Width = 32, Heads = 2, Layers = 2), EmbedDim = 32))
    let keys = clip.state_dict().Keys |> Set.ofSeq
    keys |> should not' (contain "model.attn_mask")
    keys |> should contain "model.logit_scale"
    keys |> should contain "model.text_projection"
    keys |> Seq.exists (fun k -> k.StartsWith "model.visual") |> should be False

[<Fact>]
let ``penultimate mode never runs the last residual block`` () =
    use fx = Fixture.Load(fixture "clip.safetensors")
    use clip = new FrozenOpenClipEmbedder(ClipConfig.FromJson fx.Config)
    let w = Collections.Generic.Dictionary<string, torch.Tensor>(fx.Weights())
    let last = (ClipConfig.FromJson fx.Config).Text.Layers - 1
    for k in List.ofSeq w.Keys do
        if k.StartsWith(sprintf "model.transformer.resblocks.%d." last) then w.[k] <- torch.full_like(w.[k], 1e3)
    StateDictLoader.Load(clip, w) |> ignore
    use _ = torch.no_grad()
    use y = clip.forward(fx.In "tokens")
    maxAbsDiff y (fx.Out "embedding") |> should be (lessThan 1e-5)

[<Fact>]
let ``Encode(prompts) tokenizes and encodes like the official encode(text)`` () =
    use fx = Fixture.Load(fixture "clip.safetensors")
    use clip = new FrozenOpenClipEmbedder(ClipConfig.FromJson fx.Config, tokenizer.Force())
    StateDictLoader.Load(clip, fx.Weights()) |> ignore
    let prompts = fx.MetaJson("prompts").AsArray() |> Seq.map (fun n -> n.GetValue<string>()) |> List.ofSeq
    use _ = torch.no_grad()
    use y = clip.Encode prompts
    y.shape |> should equal [| 5L; 77L; 32L |]
    maxAbsDiff y (fx.Out "embedding") |> should be (lessThan 1e-5)

[<Fact>]
let ``gradients flow from the decoded image back to the latent (needed by RGB-space guidance)`` () =
    use fx = Fixture.Load(fixture "vae.safetensors")
    use vae = new AutoencoderKL(VaeConfig.FromJson fx.Config)
    StateDictLoader.Load(vae, fx.Weights()) |> ignore
    use z = (fx.In "z").detach().requires_grad_(true)
    use loss = vae.DecodeScaled(z).square().mean()
    loss.backward()
    let g = z.grad
    isNull g |> should be False
    g.shape |> should equal z.shape
    g.isfinite().all().item<bool>() |> should be True
    g.abs().max().item<float32>() |> should be (greaterThan 0.0f)

[<Fact>]
/// Large images give the VAE's middle attention contiguous tokens (libtorch's CPU flash kernel, O(tokens) memory,
/// instead of the math path's tokens² scores: 26.8 GB for a 2560×2048 image). The switch must not change values beyond
/// rounding; the threshold is lowered on this thread only, so the same small input runs both paths.
let ``VAE attention: the contiguous large-image path equals the default path to rounding, and small inputs keep the default`` () =
    use block = new AttnBlock(32L, 8)
    DiffBIR.Lab.Training.TinyRecipe.InitFromScratch(block, 21L)
    use _ = torch.no_grad ()
    use x = torch.randn([| 2L; 32L; 12L; 10L |], generator = new torch.Generator(22UL))
    AttnBlock.FlashAboveScoreElements |> should equal (1L <<< 27)
    use byDefault = block.forward x
    let before = AttnBlock.FlashAboveScoreElements
    AttnBlock.FlashAboveScoreElements <- 0L
    try
        use contiguous = block.forward x
        maxAbsDiff contiguous byDefault |> should be (lessThan 1e-5)
        maxAbsDiff contiguous x |> should be (greaterThan 1e-3)   // the attention did something
    finally AttnBlock.FlashAboveScoreElements <- before
