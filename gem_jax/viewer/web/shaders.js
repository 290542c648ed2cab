// GLSL ES 3.00 sources of the viewer's three passes (docs/architecture.md §11).
//
// 1. EVAL: one fragment per Gaussian (texel i = y·width + x of a width×rows target) evaluates
//    the eigen model X_m = mean_m + (k_m·σ_m) @ U_m per modality (GEM, arXiv 2407.04545, §3.1),
//    makes the Gaussian valid exactly as gem_jax/eigen/model.py `activate` does, then applies the
//    head's rigid root pose (gem_jax/rigid.py). Bases are 2D-array textures: layer 0 holds the
//    mean, layer j+1 component j; `uCoef` holds k·σ (one texel per coefficient).
// 2. SPLAT: one instanced quad per Gaussian in depth order (front to back, from the sort
//    worker). The vertex shader is gem_jax/render/project.py (EWA projection, frustum-clamped
//    Jacobian, 0.3 dilation, 3σ radius, near plane 0.01, off-screen culling); the quad is the
//    oriented rectangle around the ellipse where o·exp(−σ) ≥ 1/255, and fragments outside the
//    16×16 tiles of the 3σ square (gem_jax/render/tiles.py) are discarded: together, exactly the
//    pixels rasterize can blend the Gaussian into. The fragment shader is the blending
//    rule of gem_jax/render/reference.py: σ < 0 skipped, α = min(0.99, o·exp(−σ)), α < 1/255
//    skipped; premultiplied output blended front to back (C += T·α·c, T ← T·(1 − α)).
// 3. COMPOSITE: image = C + T·background into the canvas.

export const EVAL_VS = `#version 300 es
void main() {
  // one triangle covering the viewport
  vec2 p = vec2(float((gl_VertexID & 1) << 2) - 1.0, float((gl_VertexID & 2) << 1) - 1.0);
  gl_Position = vec4(p, 0.0, 1.0);
}`;

export const EVAL_FS = `#version 300 es
precision highp float;
precision highp int;
precision highp sampler2D;
precision highp sampler2DArray;
uniform sampler2DArray uBasis[4];  // position, rotation, scale, opacity
uniform sampler2D uCoef;           // (ΣK, 1) R32F: k·σ
uniform ivec4 uK;                  // components per modality
uniform ivec4 uOffset;             // first coefficient of each modality in uCoef
uniform int uN;
uniform int uWidth;
uniform mat3 uRootR;               // root pose: x ↦ R x + t, q ↦ q(R) ⊗ q
uniform vec3 uRootT;
uniform vec4 uRootQ;               // wxyz
layout(location = 0) out vec4 oMean;
layout(location = 1) out vec4 oQuat;
layout(location = 2) out vec4 oScaleOpacity;

const float SCALE_MIN = 1e-6;
const float OPACITY_EPS = 1e-4;

float coef(int j) { return texelFetch(uCoef, ivec2(j, 0), 0).r; }

vec4 quatMul(vec4 a, vec4 b) {  // Hamilton product, wxyz
  return vec4(a.x * b.x - a.y * b.y - a.z * b.z - a.w * b.w,
              a.x * b.y + a.y * b.x + a.z * b.w - a.w * b.z,
              a.x * b.z - a.y * b.w + a.z * b.x + a.w * b.y,
              a.x * b.w + a.y * b.z - a.z * b.y + a.w * b.x);
}

void main() {
  ivec2 p = ivec2(gl_FragCoord.xy);
  if (p.y * uWidth + p.x >= uN) {
    oMean = vec4(0.0); oQuat = vec4(1.0, 0.0, 0.0, 0.0); oScaleOpacity = vec4(1.0, 1.0, 1.0, 0.0);
    return;
  }
  vec3 x = texelFetch(uBasis[0], ivec3(p, 0), 0).xyz;
  for (int j = 0; j < uK.x; ++j) x += coef(uOffset.x + j) * texelFetch(uBasis[0], ivec3(p, j + 1), 0).xyz;
  vec4 q = texelFetch(uBasis[1], ivec3(p, 0), 0);
  for (int j = 0; j < uK.y; ++j) q += coef(uOffset.y + j) * texelFetch(uBasis[1], ivec3(p, j + 1), 0);
  vec3 s = texelFetch(uBasis[2], ivec3(p, 0), 0).xyz;
  for (int j = 0; j < uK.z; ++j) s += coef(uOffset.z + j) * texelFetch(uBasis[2], ivec3(p, j + 1), 0).xyz;
  float o = texelFetch(uBasis[3], ivec3(p, 0), 0).x;
  for (int j = 0; j < uK.w; ++j) o += coef(uOffset.w + j) * texelFetch(uBasis[3], ivec3(p, j + 1), 0).x;
  float n2 = dot(q, q);  // validity, as gem_jax/eigen/model.py activate()
  q = n2 > 1e-12 ? q * inversesqrt(n2) : vec4(1.0, 0.0, 0.0, 0.0);
  s = max(s, vec3(SCALE_MIN));
  o = clamp(o, OPACITY_EPS, 1.0 - OPACITY_EPS);
  oMean = vec4(uRootR * x + uRootT, 1.0);
  oQuat = quatMul(uRootQ, q);
  oScaleOpacity = vec4(s, o);
}`;

export const SPLAT_VS = `#version 300 es
precision highp float;
precision highp int;
precision highp sampler2D;
layout(location = 0) in uint aIndex;  // Gaussian id, one per instance, in depth order
uniform sampler2D uMean;
uniform sampler2D uQuat;
uniform sampler2D uScaleOpacity;
uniform sampler2D uColor;
uniform int uWidth;                   // texel layout width of the Gaussian textures
uniform mat4 uView;                   // world → camera (OpenCV axes)
uniform vec4 uIntrinsics;             // fx, fy, cx, cy
uniform vec2 uImage;                  // image width, height in pixels
flat out vec2 vMean;
flat out vec3 vConic;
flat out vec3 vColor;
flat out float vOpacity;
flat out vec4 vRect;  // the tiles' pixel rectangle [x0, x1) × [y0, y1)

const float NEAR_PLANE = 0.01;
const float EPS_2D = 0.3;
const float CLAMP_MARGIN = 0.3;
const float TILE = 16.0;
const float ALPHA_MIN = 1.0 / 255.0;

mat3 quatToMat(vec4 q) {  // wxyz, normalised
  float w = q.x, x = q.y, y = q.z, z = q.w;
  return mat3(1.0 - 2.0 * (y * y + z * z), 2.0 * (x * y + w * z), 2.0 * (x * z - w * y),   // column 0
              2.0 * (x * y - w * z), 1.0 - 2.0 * (x * x + z * z), 2.0 * (y * z + w * x),   // column 1
              2.0 * (x * z + w * y), 2.0 * (y * z - w * x), 1.0 - 2.0 * (x * x + y * y));  // column 2
}

void cull() { gl_Position = vec4(0.0, 0.0, 2.0, 1.0); }  // outside the clip volume

void main() {
  int i = int(aIndex);
  ivec2 t = ivec2(i % uWidth, i / uWidth);
  vec3 mean = texelFetch(uMean, t, 0).xyz;
  vec4 so = texelFetch(uScaleOpacity, t, 0);
  float o = so.w;
  vec3 pc = (uView * vec4(mean, 1.0)).xyz;
  if (pc.z < NEAR_PLANE || o < ALPHA_MIN) { cull(); return; }
  float fx = uIntrinsics.x, fy = uIntrinsics.y, cx = uIntrinsics.z, cy = uIntrinsics.w;
  float W = uImage.x, H = uImage.y;
  // EWA (3DGS eqs. 5-6) with the frustum clamp of the Jacobian (gem_jax/render/project.py)
  mat3 M = quatToMat(normalize(texelFetch(uQuat, t, 0))) * mat3(so.x, 0.0, 0.0, 0.0, so.y, 0.0, 0.0, 0.0, so.z);
  mat3 Wr = mat3(uView);
  mat3 covCam = Wr * (M * transpose(M)) * transpose(Wr);
  float rz = 1.0 / pc.z;
  float tanX = 0.5 * W / fx, tanY = 0.5 * H / fy;
  float tx = pc.z * clamp(pc.x * rz, -(cx / fx + CLAMP_MARGIN * tanX), (W - cx) / fx + CLAMP_MARGIN * tanX);
  float ty = pc.z * clamp(pc.y * rz, -(cy / fy + CLAMP_MARGIN * tanY), (H - cy) / fy + CLAMP_MARGIN * tanY);
  vec3 j0 = vec3(fx * rz, 0.0, -fx * tx * rz * rz);
  vec3 j1 = vec3(0.0, fy * rz, -fy * ty * rz * rz);
  vec3 cj0 = covCam * j0, cj1 = covCam * j1;
  float a = dot(j0, cj0) + EPS_2D;
  float b = 0.5 * (dot(j0, cj1) + dot(j1, cj0));
  float c = dot(j1, cj1) + EPS_2D;
  float det = a * c - b * b;
  if (!(det > 0.0)) { cull(); return; }
  float lam = 0.5 * (a + c) + sqrt(max(0.25 * (a - c) * (a - c) + b * b, 0.0));
  float r = ceil(3.0 * sqrt(max(lam, 0.0)));
  vec2 uv = vec2(fx * pc.x * rz + cx, fy * pc.y * rz + cy);
  if (!(r > 0.0) || !(uv.x + r > 0.0 && uv.x - r < W && uv.y + r > 0.0 && uv.y - r < H)) { cull(); return; }
  // Pixels rasterize can reach: inside the 16×16 tiles of the 3σ square (gem_jax/render/tiles.py;
  // clipped in the fragment shader) and where o·exp(−σ) ≥ 1/255, the ellipse σ ≤ L = ln(255·o)
  // with half-axes √(2Lλ) along the eigenvectors of the dilated covariance: the quad is that
  // ellipse's oriented bounding rectangle, 1 px wider for rounding.
  vec2 tiles = ceil(uImage / TILE);
  vec2 lo = clamp(floor((uv - r) / TILE), vec2(0.0), tiles) * TILE;
  vec2 hi = min(clamp(ceil((uv + r) / TILE), vec2(0.0), tiles) * TILE, uImage);
  if (!(hi.x > lo.x && hi.y > lo.y)) { cull(); return; }
  float level = 2.0 * log(o / ALPHA_MIN);
  float lam2 = max(0.5 * (a + c) - sqrt(max(0.25 * (a - c) * (a - c) + b * b, 0.0)), 0.0);
  vec2 axis = abs(b) > 1e-12 * (a + c) ? normalize(vec2(b, lam - a)) : (a >= c ? vec2(1.0, 0.0) : vec2(0.0, 1.0));
  vec2 corner = vec2(float(gl_VertexID & 1), float((gl_VertexID >> 1) & 1)) * 2.0 - 1.0;
  vec2 pixel = uv + corner.x * (sqrt(level * lam) + 1.0) * axis + corner.y * (sqrt(level * lam2) + 1.0) * vec2(-axis.y, axis.x);
  gl_Position = vec4(2.0 * pixel.x / W - 1.0, 1.0 - 2.0 * pixel.y / H, 0.0, 1.0);
  vRect = vec4(lo, hi);
  vMean = uv;
  vConic = vec3(c / det, -b / det, a / det);
  vColor = texelFetch(uColor, t, 0).rgb;
  vOpacity = o;
}`;

export const SPLAT_FS = `#version 300 es
precision highp float;
uniform vec2 uImage;
flat in vec2 vMean;
flat in vec3 vConic;
flat in vec3 vColor;
flat in float vOpacity;
flat in vec4 vRect;
out vec4 oColor;
const float ALPHA_MAX = 0.99;
const float ALPHA_MIN = 1.0 / 255.0;
void main() {
  vec2 p = vec2(gl_FragCoord.x, uImage.y - gl_FragCoord.y);  // pixel centres at j + 0.5
  if (p.x < vRect.x || p.y < vRect.y || p.x > vRect.z || p.y > vRect.w) discard;
  vec2 d = vMean - p;
  float sigma = 0.5 * (vConic.x * d.x * d.x + vConic.z * d.y * d.y) + vConic.y * d.x * d.y;
  if (sigma < 0.0) discard;
  float raw = vOpacity * exp(-sigma);
  if (raw < ALPHA_MIN) discard;
  float alpha = min(ALPHA_MAX, raw);
  oColor = vec4(alpha * vColor, alpha);  // premultiplied; blended front to back
}`;

export const COMPOSITE_FS = `#version 300 es
precision highp float;
precision highp sampler2D;
uniform sampler2D uAccum;  // rgb = Σ T·α·c, a = 1 − T
uniform vec3 uBackground;
out vec4 oColor;
void main() {
  vec4 acc = texelFetch(uAccum, ivec2(gl_FragCoord.xy), 0);
  oColor = vec4(acc.rgb + (1.0 - acc.a) * uBackground, 1.0);
}`;
