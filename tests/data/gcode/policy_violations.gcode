;FLAVOR:Marlin
M104 S210
M140 S60
M500 ; save settings: blocked
N10 M502*33
m997
M109 R350 ; too hot
M190 S130 ; bed too hot
M104 T1 S250
M1040 S999 ; not a heater command
; M500 in a comment is fine
G1 X10 Y10
