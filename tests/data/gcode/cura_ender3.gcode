;FLAVOR:Marlin
;TIME:5012
;Filament used: 2.35853m
;Layer height: 0.2
;MINX:86.795
;MINY:86.795
;MINZ:0.2
;MAXX:148.205
;MAXY:148.205
;MAXZ:20
;TARGET_MACHINE.NAME:Creality Ender-3
;Generated with Cura_SteamEngine 5.2.1
M140 S50
M105
M190 S50
M104 S200
M105
M109 S200
M82 ;absolute extrusion mode
; Ender 3 Custom Start G-code
G92 E0 ; Reset Extruder
G28 ; Home all axes
G1 Z2.0 F3000 ; Move Z Axis up little to prevent scratching of Heat Bed
G1 X0.1 Y20 Z0.3 F5000.0 ; Move to start position
G1 X0.1 Y200.0 Z0.3 F1500.0 E15 ; Draw the first line
G1 X0.4 Y200.0 Z0.3 F5000.0 ; Move to side a little
G1 X0.4 Y20 Z0.3 F1500.0 E30 ; Draw the second line
G92 E0 ; Reset Extruder
G1 Z2.0 F3000 ; Move Z Axis up little to prevent scratching of Heat Bed
G1 X5 Y20 Z0.3 F5000.0 ; Move over to prevent blob squish
G92 E0
G92 E0
G1 F2700 E-5
;LAYER_COUNT:100
;LAYER:0
M107
G0 F6000 X107.5 Y107.5 Z0.2
;TYPE:WALL-OUTER
;LAYER_CHANGE
G1 Z0.200 F10800
G1 X107.500 Y107.500
G1 F1800 X127.500 Y107.500 E0.00000
G1 F1800 X127.500 Y127.500 E0.66000
G1 F1800 X107.500 Y127.500 E1.32000
G1 F1800 X107.500 Y107.500 E1.98000
;TIME_ELAPSED:50.500000
;LAYER_CHANGE
G1 Z0.400 F10800
G1 X107.500 Y107.500
G1 F1800 X127.500 Y107.500 E2.64000
G1 F1800 X127.500 Y127.500 E3.30000
G1 F1800 X107.500 Y127.500 E3.96000
G1 F1800 X107.500 Y107.500 E4.62000
;TIME_ELAPSED:101.000000
;LAYER_CHANGE
G1 Z0.600 F10800
G1 X107.500 Y107.500
G1 F1800 X127.500 Y107.500 E5.28000
G1 F1800 X127.500 Y127.500 E5.94000
G1 F1800 X107.500 Y127.500 E6.60000
G1 F1800 X107.500 Y107.500 E7.26000
;TIME_ELAPSED:151.500000
G1 F2700 E-5
M140 S0
M107
G91 ;Relative positioning
G1 E-2 F2700 ;Retract a bit
G1 E-2 Z0.2 F2400 ;Retract and raise Z
G1 X5 Y5 F3000 ;Wipe out
G1 Z10 ;Raise Z more
G90 ;Absolute positioning
G1 X0 Y235 ;Present print
M106 S0 ;Turn-off fan
M104 S0 ;Turn-off hotend
M140 S0 ;Turn-off bed
M84 X Y E ;Disable all steppers but Z
M82 ;absolute extrusion mode
M104 S0
;End of Gcode
;SETTING_3 {"global_quality": "[general]\\nversion = 4\\nname = Standard Quality #2\\ndefinition = c
;SETTING_3 reality_ender3\\n\\n[metadata]\\ntype = quality_changes\\nquality_type = st
;SETTING_3 andard\\nsetting_version = 20\\n\\n[values]\\nadhesion_type = skirt\\n\\n"}
