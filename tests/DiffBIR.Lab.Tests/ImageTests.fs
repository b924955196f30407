/// Image files in and out: formats, bit depths, alpha, orientation, limits, corrupt input, atomic writes.
module DiffBIR.Lab.Tests.ImageTests

open System
open System.IO
open Xunit
open FsUnit.Xunit
open SixLabors.ImageSharp
open SixLabors.ImageSharp.PixelFormats
open SixLabors.ImageSharp.Metadata.Profiles.Exif
open TorchSharp
open DiffBIR.Lab.IO
open DiffBIR.Lab.Tests.TestSupport

let private pattern8 (w: int) (h: int) =
    let img = new Image<Rgb24>(w, h)
    for y in 0 .. h - 1 do
        for x in 0 .. w - 1 do
            img.[x, y] <- Rgb24(byte ((x * 37 + y) % 256), byte ((y * 11) % 256), byte ((x * y) % 256))
    img

let private loadU8 path =
    use l = ImageIO.Load path
    ImageIO.ToUInt8(l.Image), l.Info

[<Fact>]
let ``PNG round trip is exact and pixels are v over 255`` () =
    use dir = new TempDir()
    use img = pattern8 23 17
    img.SaveAsPng(dir.File "a.png")
    use loaded_t = ImageIO.Load(dir.File "a.png")
    let t, info = loaded_t.Image, loaded_t.Info
    t.shape |> should equal [| 1L; 3L; 17L; 23L |]
    info.BitDepth |> should equal 8
    info.Format |> should equal "PNG"
    // pixel (x=5, y=3): R = (5*37+3) % 256 = 188
    t.[0L, 0L, 3L, 5L].item<float32>() |> should equal (188.0f / 255.0f)
    ImageIO.Save(dir.File "b.png", t)
    use a = ImageIO.ToUInt8 t
    let b, _ = loadU8 (dir.File "b.png")
    use b = b
    a.equal(b).all().item<bool>() |> should be True

[<Fact>]
let ``16-bit PNG keeps 16-bit precision`` () =
    use dir = new TempDir()
    use img = new Image<Rgb48>(4, 3)
    img.[1, 2] <- Rgb48(12345us, 65535us, 1us)
    img.SaveAsPng(dir.File "d16.png", Formats.Png.PngEncoder(BitDepth = Formats.Png.PngBitDepth.Bit16, ColorType = Formats.Png.PngColorType.Rgb))
    use loaded_t = ImageIO.Load(dir.File "d16.png")
    let t, info = loaded_t.Image, loaded_t.Info
    info.BitDepth |> should equal 16
    t.[0L, 0L, 2L, 1L].item<float32>() |> should equal (12345.0f / 65535.0f)
    t.[0L, 2L, 2L, 1L].item<float32>() |> should equal (1.0f / 65535.0f)

[<Fact>]
let ``greyscale becomes RGB with equal channels`` () =
    use dir = new TempDir()
    use img = new Image<L8>(5, 5)
    img.[2, 2] <- L8(200uy)
    img.SaveAsPng(dir.File "g.png")
    use loaded_t = ImageIO.Load(dir.File "g.png")
    let t, _ = loaded_t.Image, loaded_t.Info
    t.shape.[1] |> should equal 3L
    for c in 0L .. 2L do t.[0L, c, 2L, 2L].item<float32>() |> should equal (200.0f / 255.0f)

[<Fact>]
let ``alpha is dropped with a notice`` () =
    use dir = new TempDir()
    use img = new Image<Rgba32>(3, 3)
    img.[0, 0] <- Rgba32(10uy, 20uy, 30uy, 0uy)
    img.[1, 1] <- Rgba32(50uy, 60uy, 70uy, 255uy)
    img.SaveAsPng(dir.File "a.png")
    use loaded_t = ImageIO.Load(dir.File "a.png")
    let t, info = loaded_t.Image, loaded_t.Info
    info.HadAlpha |> should be True
    info.Notices |> Seq.exists (fun n -> n.Contains "alpha") |> should be True
    t.shape.[1] |> should equal 3L
    t.[0L, 0L, 1L, 1L].item<float32>() |> should equal (50.0f / 255.0f)

[<Fact>]
let ``EXIF orientation is applied`` () =
    use dir = new TempDir()
    use img = pattern8 40 20
    img.Metadata.ExifProfile <- ExifProfile()
    img.Metadata.ExifProfile.SetValue(ExifTag.Orientation, 6us) // rotate 90° clockwise to display
    img.SaveAsJpeg(dir.File "o.jpg")
    use loaded_t = ImageIO.Load(dir.File "o.jpg")
    let t, info = loaded_t.Image, loaded_t.Info
    (info.Width, info.Height) |> should equal (20, 40)
    t.shape |> should equal [| 1L; 3L; 40L; 20L |]
    info.Notices |> Seq.exists (fun n -> n.Contains "orientation") |> should be True

[<Theory>]
[<InlineData("bmp")>]
[<InlineData("tiff")>]
[<InlineData("webp")>]
let ``BMP, TIFF and lossless WebP read back exactly`` (ext: string) =
    use dir = new TempDir()
    use img = pattern8 16 9
    let path = dir.File("x." + ext)
    match ext with
    | "bmp" -> img.SaveAsBmp path
    | "tiff" -> img.SaveAsTiff path
    | _ -> img.SaveAsWebp(path, Formats.Webp.WebpEncoder(FileFormat = Formats.Webp.WebpFileFormatType.Lossless))
    img.SaveAsPng(dir.File "ref.png")
    let a, _ = loadU8 path
    let b, _ = loadU8 (dir.File "ref.png")
    a.equal(b).all().item<bool>() |> should be True

[<Fact>]
let ``JPEG out at quality 95 is close`` () =
    use dir = new TempDir()
    use img = pattern8 32 32
    img.SaveAsPng(dir.File "ref.png")
    use loaded_t = ImageIO.Load(dir.File "ref.png")
    let t, _ = loaded_t.Image, loaded_t.Info
    ImageIO.Save(dir.File "q.jpg", t, Quantization.Round, 95)
    use loaded_j = ImageIO.Load(dir.File "q.jpg")
    let j, info = loaded_j.Image, loaded_j.Info
    info.Format |> should equal "JPEG"
    let err = (j - t).abs().mean().item<float32>() * 255.0f
    err |> should be (lessThan 12.0f) // a hard synthetic pattern; smooth photos are ≈ 0.5 levels

let private assertRefused (path: string) (fragment: string) =
    let e = Assert.Throws<ImageFileException>(fun () -> (ImageIO.Load path).Dispose())
    e.Message |> should haveSubstring (Path.GetFileName path)
    e.Message.ToLowerInvariant() |> should haveSubstring fragment

[<Fact>]
let ``zero-byte, random, truncated and unsupported files are refused with the file name`` () =
    use dir = new TempDir()
    File.WriteAllBytes(dir.File "empty.png", [||])
    assertRefused (dir.File "empty.png") "empty"
    File.WriteAllBytes(dir.File "noise.png", Array.init 500 (fun i -> byte ((i * 7919) % 251)))
    assertRefused (dir.File "noise.png") "unsupported"
    use img = pattern8 64 64
    img.SaveAsPng(dir.File "full.png")
    let bytes = File.ReadAllBytes(dir.File "full.png")
    File.WriteAllBytes(dir.File "half.png", bytes.[.. bytes.Length / 2])
    assertRefused (dir.File "half.png") "truncated"
    img.SaveAsJpeg(dir.File "full.jpg")
    let jb = File.ReadAllBytes(dir.File "full.jpg")
    File.WriteAllBytes(dir.File "half.jpg", jb.[.. jb.Length / 2])
    assertRefused (dir.File "half.jpg") "truncated"
    img.SaveAsGif(dir.File "anim.gif")
    assertRefused (dir.File "anim.gif") "unsupported"
    assertRefused (dir.File "missing.png") "not found"

/// CRC-32 (PNG chunks) so the test can forge a header.
let private crc32 (data: byte[]) =
    let table =
        Array.init 256 (fun n ->
            let mutable c = uint32 n
            for _ in 0 .. 7 do c <- if c &&& 1u <> 0u then 0xEDB88320u ^^^ (c >>> 1) else c >>> 1
            c)
    let mutable c = 0xFFFFFFFFu
    for b in data do c <- table.[int ((c ^^^ uint32 b) &&& 0xFFu)] ^^^ (c >>> 8)
    c ^^^ 0xFFFFFFFFu

[<Fact>]
let ``limits are checked from the header before decoding`` () =
    use dir = new TempDir()
    use img = new Image<Rgb24>(1, 1)
    img.SaveAsPng(dir.File "tiny.png")
    let b = File.ReadAllBytes(dir.File "tiny.png")
    // IHDR data starts at byte 16: width, height (big-endian); claim 30000 × 30000.
    let be (v: int) = [| byte (v >>> 24); byte (v >>> 16); byte (v >>> 8); byte v |]
    Array.blit (be 30000) 0 b 16 4
    Array.blit (be 30000) 0 b 20 4
    let crc = crc32 b.[12 .. 28]
    Array.blit (be (int crc)) 0 b 29 4
    File.WriteAllBytes(dir.File "huge.png", b)
    assertRefused (dir.File "huge.png") "limit"
    use small = pattern8 100 50
    small.SaveAsPng(dir.File "wide.png")
    let e = Assert.Throws<ImageFileException>(fun () -> (ImageIO.Load(dir.File "wide.png", ImageLoadOptions(MaxSide = 64))).Dispose())
    e.Message |> should haveSubstring "64 px"
    let e2 = Assert.Throws<ImageFileException>(fun () -> (ImageIO.Load(dir.File "wide.png", ImageLoadOptions(MaxMegapixels = 0.001))).Dispose())
    e2.Message |> should haveSubstring "MP"

[<Fact>]
let ``quantization truncates by default like the official code, or rounds`` () =
    use x = torch.tensor([| 0.999f; 0.5f; 1.5f; -0.2f; 0.0019f; 0.0021f |]).reshape(1L, 3L, 1L, 2L)
    use t = ImageIO.ToUInt8 x
    use r = ImageIO.ToUInt8(x, Quantization.Round)
    // HWC order: pixel 0 = (0.999, 1.5, 0.0019), pixel 1 = (0.5, -0.2, 0.0021)
    t.flatten().data<byte>().ToArray() |> should equal [| 254uy; 255uy; 0uy; 127uy; 0uy; 0uy |]
    r.flatten().data<byte>().ToArray() |> should equal [| 255uy; 255uy; 0uy; 128uy; 0uy; 1uy |]

[<Fact>]
let ``writes are atomic: no temporary file is left and a bad extension writes nothing`` () =
    use dir = new TempDir()
    use x = torch.rand(1L, 3L, 8L, 8L)
    ImageIO.Save(dir.File "out.png", x)
    ImageIO.Save(dir.File "out.png", x) // overwrite in place
    Directory.GetFiles dir.Path |> Array.map Path.GetFileName |> should equal [| "out.png" |]
    Assert.Throws<ImageFileException>(fun () -> ImageIO.Save(dir.File "out.gif", x)) |> ignore
    Directory.GetFiles dir.Path |> Array.length |> should equal 1

[<Fact>]
let ``a failing write leaves the previous file intact`` () =
    use dir = new TempDir()
    let path = dir.File "keep.txt"
    File.WriteAllText(path, "old")
    Assert.Throws<InvalidOperationException>(fun () ->
        DiffBIR.Lab.AtomicFile.Write(path, fun fs -> fs.WriteByte 1uy; raise (InvalidOperationException "disk full"))) |> ignore
    File.ReadAllText path |> should equal "old"
    Directory.GetFiles dir.Path |> Array.length |> should equal 1
